"""What a client's first bytes are, and its HTTP/1 requests one by one, for the egress
proxy (``egress_proxy.py``): ``protocol_of`` tells TLS, HTTP and other protocols apart,
``HttpRequests`` follows a connection's requests so each head is judged before any of it
goes on. Standard library only.
"""

from __future__ import annotations

import re

from .guest_tcp import MAX_INSPECT

_REQUEST_LINE = re.compile(rb"[A-Za-z]{1,20} \S{1,8192} HTTP/1\.[01]")
_PARTIAL_REQUEST_LINE = re.compile(rb"[A-Za-z]{0,20}( \S*( \S*)?)?\r?")


def protocol_of(data: bytes) -> str:
    """ "tls", "http", "tcp" (anything else), or "more" (too little to say yet) for the
    first bytes a client sent. HTTP only as a whole request line ending in HTTP/1.x:
    a line protocol (Redis, SMTP) is "tcp", refused unless its port is listed."""
    if not data:
        return "more"
    if data[0] == 0x16:
        return "tls" if len(data) < 2 or data[1] == 3 else "tcp"
    body = data.lstrip(b"\r\n")  # servers skip empty lines before a request
    end = body.find(b"\r\n")
    if end < 0:
        partial = _PARTIAL_REQUEST_LINE.fullmatch(body)
        return "more" if partial and len(body) < 8192 else "tcp"
    return "http" if _REQUEST_LINE.fullmatch(body[:end]) else "tcp"


class HttpRequests:
    """Follows the HTTP/1 requests a client sends on one connection, so that each request's
    head is judged before any of it goes on (a kept-alive connection cannot carry a second
    request to another host). ``feed(data)`` returns the bytes that may go now and the
    heads among them to judge first. Framing the host cannot follow exactly -- both
    Content-Length and Transfer-Encoding, two lengths, a coding but chunked, a chunk size
    that is not hex -- ends the connection, so no server reads a request the host did not.
    After a CONNECT or an Upgrade the stream is no longer HTTP and passes as it is (where it
    goes was judged)."""

    def __init__(self) -> None:
        self.pending = bytearray()  # received, not yet understood (a head or a chunk line)
        self.body = 0  # bytes of a Content-Length body still to pass
        self.chunk = "none"  # none | size | data | crlf | trailer
        self.chunk_left = 0
        self.passthrough = False

    def feed(self, data: bytes) -> tuple[bytes, list[bytes]] | None:
        """(bytes that may pass, heads in them to judge first), or None: not HTTP the host
        can follow."""
        buf = self.pending + data
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
            else:
                end = buf.find(b"\r\n\r\n", at)
                if end < 0:
                    if len(buf) - at > MAX_INSPECT:
                        return None
                    break
                head = bytes(buf[at : end + 4])
                if not self._frame(head):
                    return None
                heads.append(head)
                out += head
                at = end + 4
        self.pending = buf[at:]
        return bytes(out), heads

    def _frame(self, head: bytes) -> bool:
        lines = head.lstrip(b"\r\n").split(b"\r\n")
        method = lines[0].split(b" ", 1)[0].upper()
        lengths, codings, upgrade = [], [], False
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key, value = key.strip().lower(), value.strip().lower()
            if key == b"content-length":
                lengths.append(value)
            elif key == b"transfer-encoding":
                codings.append(value)
            elif key == b"upgrade":
                upgrade = True
        if len(lengths) > 1 or (lengths and codings) or codings not in ([], [b"chunked"]):
            return False
        if lengths and (not lengths[0].isdigit() or len(lengths[0]) > 15):
            return False
        self.body = int(lengths[0]) if lengths else 0
        self.chunk = "size" if codings else "none"
        self.passthrough = method == b"CONNECT" or upgrade
        return True

    def _chunk_line(self, line: bytes) -> bool:
        if self.chunk == "crlf":
            self.chunk = "size"
            return line == b""
        if self.chunk == "trailer":
            if not line:
                self.chunk = "none"  # the request is complete
            return True
        size = line.split(b";", 1)[0].strip()
        if not size or len(size) > 12 or not all(c in b"0123456789abcdefABCDEF" for c in size):
            return False
        self.chunk_left = int(size, 16)
        self.chunk = "data" if self.chunk_left else "trailer"
        return True
