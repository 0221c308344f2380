"""What a client's first bytes are, and its HTTP/1 requests one by one, for the egress
proxy (``proxy.py``): ``protocol_of`` tells TLS, HTTP and other protocols apart,
``HttpRequests`` follows a connection's requests so each head is judged before any of it
goes on. Standard library only.
"""

from __future__ import annotations

import re

from .guest_tcp import MAX_INSPECT

_REQUEST_LINE = re.compile(rb"[A-Za-z]{1,20} \S{1,8192} HTTP/1\.[01]")
_PARTIAL_REQUEST_LINE = re.compile(rb"[A-Za-z]{0,20}( \S*( \S*)?)?\r?")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,12}")  # no extensions, no spaces: nothing to misread
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r]")


def protocol_of(data: bytes) -> str:
    """ "tls", "http", "tcp" (anything else), "bad", or "more" (too little to say yet) for
    the first bytes a client sent. HTTP only as a whole request line ending in HTTP/1.x: a
    line protocol (Redis, SMTP) is "tcp", refused unless its port is listed. "bad": a first
    line that names an HTTP version but is not a request line we read (two spaces, a bare
    LF, HTTP/2's preface): a lenient server would read it as HTTP whose Host no one judged,
    so it is refused on every port."""
    if not data:
        return "more"
    if data[0] == 0x16:
        return "tls" if len(data) < 2 or data[1] == 3 else "tcp"
    body = data.lstrip(b"\r\n")  # servers skip empty lines before a request
    end = body.find(b"\r\n")
    if end >= 0 and _REQUEST_LINE.fullmatch(body[:end]):
        return "http"
    if end < 0 and _PARTIAL_REQUEST_LINE.fullmatch(body) and len(body) < 8192:
        return "more"
    first_line = body.split(b"\n", 1)[0]
    return "bad" if b"http/" in first_line.lower() else "tcp"


class HttpRequests:
    """Follows the HTTP/1 requests a client sends on one connection, so that each request's
    head is judged before any of it goes on (a kept-alive connection cannot carry a second
    request to another host). ``feed(data)`` returns the bytes that may go now and the
    heads among them to judge first. Framing the host cannot follow exactly -- both
    Content-Length and Transfer-Encoding, two lengths, a coding but chunked, chunked on
    HTTP/1.0, a chunk line that is not bare hex, a trailer -- ends the connection, so no
    server reads a request the host did not.

    The stream stops being HTTP only when the server says so: a CONNECT, or an Upgrade to
    a WebSocket, must be the connection's first request, and the guest's bytes after it
    are held until the server's status line (``response``): 2xx to a CONNECT or 101 to the
    Upgrade and the rest passes as it is (where it goes was judged); any other answer and
    the requests go on being judged. Another Upgrade (h2c) is an ordinary request."""

    def __init__(self) -> None:
        self.pending = bytearray()  # received, not yet understood (a head or a chunk line)
        self.scanned = 0  # how much of pending is known to hold no head's end
        self.body = 0  # bytes of a Content-Length body still to pass
        self.chunk = "none"  # none | size | data | crlf | trailer
        self.chunk_left = 0
        self.requests = 0
        self.awaiting: str | None = None  # "connect" | "upgrade": held for the answer
        self.status_line = bytearray()
        self.passthrough = False

    def feed(self, data: bytes) -> tuple[bytes, list[bytes]] | None:
        """(bytes that may pass, heads in them to judge first), or None: not HTTP the host
        can follow."""
        buf = self.pending
        buf += data
        out, heads, at = bytearray(), [], 0
        while at < len(buf):
            if self.passthrough:
                out += buf[at:]
                at = len(buf)
            elif self.body:
                take = min(self.body, len(buf) - at)
                out += buf[at : at + take]
                self.body -= take
                at += take
            elif self.chunk == "data":
                take = min(self.chunk_left, len(buf) - at)
                out += buf[at : at + take]
                self.chunk_left -= take
                at += take
                if not self.chunk_left:
                    self.chunk = "crlf"
            elif self.chunk != "none":
                end = buf.find(b"\r\n", at)
                if end < 0:
                    if len(buf) - at > 1024:
                        return None
                    break
                if not self._chunk_line(bytes(buf[at:end])):
                    return None
                out += buf[at : end + 2]
                at = end + 2
            elif self.awaiting:
                break  # held until the server answers the CONNECT or Upgrade
            else:
                end = buf.find(b"\r\n\r\n", max(at, at + self.scanned - 3))
                if end < 0:
                    if len(buf) - at > MAX_INSPECT:
                        return None
                    self.scanned = len(buf) - at
                    break
                self.scanned = 0
                head = bytes(buf[at : end + 4])
                if not self._frame(head):
                    return None
                heads.append(head)
                out += head
                at = end + 4
        del buf[:at]
        return bytes(out), heads

    def response(self, data: bytes) -> bool | None:
        """The server's first bytes while a CONNECT or Upgrade is ``awaiting``: None (its
        status line is not whole yet), True (the stream is no longer HTTP), False (it
        stays HTTP: the held requests are judged as any other)."""
        self.status_line += data[: 1024 - len(self.status_line)]
        if b"\r\n" not in self.status_line and len(self.status_line) < 1024:
            return None
        status = _STATUS.match(self.status_line)
        code = int(status.group(1)) if status else 0
        switched = (self.awaiting == "connect" and 200 <= code < 300) or (
            self.awaiting == "upgrade" and code == 101
        )
        self.awaiting, self.passthrough = None, switched
        self.status_line.clear()
        return switched

    def _frame(self, head: bytes) -> bool:
        lines = head.lstrip(b"\r\n").split(b"\r\n")
        request = lines[0].split(b" ")
        method, version = request[0].upper(), request[-1]
        lengths, codings, upgrades = [], [], []
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key, value = key.lower(), value.strip(b" \t").lower()  # (only what RFC 9112 skips)
            if key == b"content-length":
                lengths.append(value)
            elif key == b"transfer-encoding":
                codings.append(value)
            elif key == b"upgrade":
                upgrades.append(value)
        if len(lengths) > 1 or (lengths and codings) or codings not in ([], [b"chunked"]):
            return False
        if codings and version != b"HTTP/1.1":
            return False
        if lengths and (not lengths[0].isdigit() or len(lengths[0]) > 15):
            return False
        self.body = int(lengths[0]) if lengths else 0
        self.chunk = "size" if codings else "none"
        self.requests += 1
        if method == b"CONNECT" or upgrades == [b"websocket"]:
            if self.requests > 1 or self.body or codings:
                return False  # only a fresh connection's one request may leave HTTP
            self.awaiting = "connect" if method == b"CONNECT" else "upgrade"
        return True

    def _chunk_line(self, line: bytes) -> bool:
        if self.chunk == "crlf":
            self.chunk = "size"
            return line == b""
        if self.chunk == "trailer":
            self.chunk = "none"  # the request is complete
            return line == b""  # no trailer fields: a server may read them otherwise
        if not _CHUNK_SIZE.fullmatch(line):
            return False
        self.chunk_left = int(line, 16)
        self.chunk = "data" if self.chunk_left else "trailer"
        return True
