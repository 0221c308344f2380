"""The egress log, and what the first bytes of a connection say: shared by the network's
two helpers. With ``allow_hosts`` the egress proxy (``proxy.py``) terminates every
connection and judges it; with the network simply on, the guard (``netfilter.py``) keeps
``OpenNetwork`` for passt. Either writes the same log.

The log (``EgressLog``): one entry per destination and verdict (name if known, address,
port, protocol, count, first and last time), at most ``MAX_LOG_ENTRIES``, written as JSON
to the VM's runtime folder at most every ``LOG_INTERVAL`` seconds (at once for a newly
refused destination), and carried to the VM that replaces it at a rewind (``load``).

``classify`` reads a client's first bytes: a TLS ClientHello's one SNI host name (refused
when an encrypted client hello hides it), an HTTP/1 request head's Host header and any
absolute or CONNECT target -- strict where servers are lenient (a bare CR or LF, a header
name that is not a token, a folded line: refused), so no server reads a head otherwise.
Standard library only: both helpers run as ``python -I``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

from . import dns
from .allowlist import valid_name

HIDDEN_NAME_EXTENSIONS = frozenset({0xFE08, 0xFE09, 0xFE0A, 0xFE0B, 0xFE0C, 0xFE0D, 0xFFCE})
SYN_RESEND_SECONDS = 0.5  # Linux resends a SYN after 1 s
OPENING_SECONDS = 30.0  # a connection passt has not answered by then is forgotten
MAX_OPENING = 256  # connections being opened at once (netfilter.MAX_TCP_FLOWS)
MAX_NAMED = 4096  # addresses the log has names for
MAX_LOG_ENTRIES = 1024
LOG_INTERVAL = 0.2
LOG_FILE = "egress.json"
POLICY_FILE = "egress-policy.json"
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10


# ------------------------------------------------------------------ the log
class EgressLog:
    def __init__(self, path: Path | None, allow_hosts: list[str] | None) -> None:
        self.path, self.allow_hosts = path, allow_hosts
        self.entries: dict[tuple, list] = {}
        self.totals = {"allowed": 0, "blocked": 0}
        self.lost = 0
        self.lock = threading.Lock()
        self.dirty, self.written = False, 0.0
        self.flush_lock = threading.Lock()  # both directions' threads and the log thread

    def record(self, name: str | None, addr: bytes, port: int | None, proto: str,
               allowed: bool) -> None:  # fmt: skip
        verdict = "allowed" if allowed else "blocked"
        key = (name, socket.inet_ntoa(addr), port, proto, verdict)
        now = time.time()
        new = False
        with self.lock:
            self.totals[verdict] += 1
            entry = self.entries.get(key)
            if entry is not None:
                entry[0] += 1
                entry[2] = now
            elif len(self.entries) < MAX_LOG_ENTRIES:
                self.entries[key] = [1, now, now]
                new = True
            else:
                self.lost += 1
            self.dirty = True
        if not allowed:
            # A newly refused destination is on disk before the guest hears of it (a report
            # read right after the code ends names it); repeats wait for the interval.
            self.flush(force=new)

    def load(self) -> None:
        """Go on from the log already in ``path`` (the kernel's, from before a rewind)."""
        try:
            old = json.loads(self.path.read_text()) if self.path is not None else {}
        except (OSError, ValueError):
            return
        if not isinstance(old, dict):
            return
        with self.lock:
            for verdict in ("allowed", "blocked"):
                with contextlib.suppress(TypeError, ValueError):
                    self.totals[verdict] += int(old.get(verdict, 0))
            for e in old.get("entries", [])[:MAX_LOG_ENTRIES]:
                with contextlib.suppress(TypeError, ValueError, KeyError, AttributeError):
                    key = (e["name"], str(e["address"]), e["port"], str(e["protocol"]),
                           str(e["verdict"]))  # fmt: skip
                    self.entries[key] = [int(e["count"]), float(e["first"]), float(e["last"])]

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "allow_hosts": self.allow_hosts,
                "allowed": self.totals["allowed"],
                "blocked": self.totals["blocked"],
                "entries_lost": self.lost,
                "entries": [
                    {"name": k[0], "address": k[1], "port": k[2], "protocol": k[3],
                     "verdict": k[4], "count": v[0], "first": round(v[1], 3),
                     "last": round(v[2], 3)}
                    for k, v in self.entries.items()
                ],
            }  # fmt: skip

    def flush(self, force: bool = False) -> None:
        if self.path is None or not self.dirty:
            return
        with self.flush_lock:
            now = time.monotonic()
            if not self.dirty or (not force and now - self.written < LOG_INTERVAL):
                return
            self.dirty, self.written = False, now
            snapshot = self.snapshot()
            snapshot["written"] = round(time.time(), 3)
            tmp = self.path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(snapshot))
                os.replace(tmp, self.path)
            except OSError:
                pass  # the runtime folder is going away with its VM


# ------------------------------------------------------------------ what the guard answers
def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_prohibited(frame: bytes) -> bytes:
    """ICMP destination unreachable, "communication administratively prohibited"."""
    ihl = (frame[14] & 0x0F) * 4
    quoted = bytes(frame[14 : 14 + ihl + 8])
    body = struct.pack("!BBHI", 3, 13, 0, 0) + quoted
    return body[:2] + struct.pack("!H", _checksum(body)) + body[4:]


# ------------------------------------------------------------------ what a flow says
Named = list[tuple[str, int | None]]  # host names a client gave, with a port if it named one


def _tls_names(buf: bytes) -> tuple[str, Named]:
    """("more" | "done" | "bad", [sni]) for a TLS record that should hold a ClientHello.
    Decided on the whole hello: one SNI host name, no encrypted client hello."""
    if len(buf) < 9:
        return "more", []
    reclen = struct.unpack_from("!H", buf, 3)[0]
    hello_len = int.from_bytes(buf[6:9], "big")
    if buf[5] != 1 or hello_len + 4 > reclen:
        return "bad", []  # not a hello, or one spread over records
    if len(buf) < 5 + reclen:
        return "more", []
    hello = buf[9 : 9 + hello_len]
    names: Named = []
    try:
        pos = 2 + 32  # version, random
        pos += 1 + hello[pos]  # session id
        pos += 2 + struct.unpack_from("!H", hello, pos)[0]  # cipher suites
        pos += 1 + hello[pos]  # compression methods
        ext_end = pos + 2 + struct.unpack_from("!H", hello, pos)[0]
        if ext_end != len(hello):
            return "bad", []
        pos += 2
        while pos < ext_end:
            etype, elen = struct.unpack_from("!HH", hello, pos)
            data = hello[pos + 4 : pos + 4 + elen]
            pos += 4 + elen
            if len(data) != elen or etype in HIDDEN_NAME_EXTENSIONS:
                return "bad", []  # encrypted client hello (or its drafts, or ESNI) hides a name
            if etype == 0:
                if names or len(data) < 5 or data[2] != 0:
                    return "bad", []
                nlen = struct.unpack_from("!H", data, 3)[0]
                if 5 + nlen != len(data) or struct.unpack_from("!H", data)[0] != nlen + 3:
                    return "bad", []
                sni = data[5:].decode("latin-1").lower()
                sni = sni[:-1] if sni.endswith(".") else sni
                if not valid_name(sni):
                    return "bad", []
                names.append((sni, None))
    except (IndexError, struct.error):
        return "bad", []
    return ("done", names) if names else ("bad", [])


_HOST = re.compile(r"([a-z0-9_.-]{1,254})(?::([0-9]{1,5}))?")
_TOKEN = re.compile(rb"[A-Za-z]{1,20}")
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _host_of(text: bytes) -> tuple[str, int | None] | None:
    """(host name, port) of ``name[:port]``, or None if it is anything else."""
    m = _HOST.fullmatch(text.decode("latin-1").lower())
    if m is None:
        return None
    name = m.group(1)[:-1] if m.group(1).endswith(".") else m.group(1)
    return (name, int(m.group(2)) if m.group(2) else None) if valid_name(name) else None


def _http_names(data: bytes) -> tuple[str, Named]:
    """("more" | "done" | "bad", hosts) of an HTTP/1 request head: its one Host header, and
    the host of an absolute-form or CONNECT target (servers route on either). Strict where
    servers are lenient: a bare LF or CR, a header name that is not a token (``Host :``) or
    a folded line is refused, so no server reads a head the guard read otherwise."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    if end < 0 and head.endswith(b"\r"):
        head = head[:-1]  # its LF is in the next segment
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        return "bad", []
    if end < 0:
        return "more", []
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return "bad", []
    method, target = parts[0].upper(), parts[1]
    hosts = []
    for line in lines[1:]:
        key, sep, value = line.partition(b":")
        if not sep or not _FIELD_NAME.fullmatch(key):
            return "bad", []  # a folded line, or a name with whitespace
        if key.lower() == b"host":
            hosts.append(value.strip(b" \t"))
    if len(hosts) > 1 or (not hosts and method != b"CONNECT"):
        return "bad", []
    # A Host names the connection's port; a CONNECT target (and its Host) their own.
    named: list[tuple[bytes, bool]] = [(h, method == b"CONNECT") for h in hosts]
    if method == b"CONNECT":
        named.append((target, True))
    elif target[:1] != b"/" and target != b"*":
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return "bad", []
        authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
        if b"@" in authority:
            return "bad", []
        named.append((authority, False))
    out: Named = []
    for text, its_port_counts in named:
        host = _host_of(text)
        if host is None or (its_port_counts and host[1] is None and text is target):
            return "bad", []
        out.append((host[0], host[1] if its_port_counts else None))
    return "done", out


def classify(buf: bytes) -> tuple[str, str, Named]:
    """(state, protocol, names) of the first bytes a client sent: state "more" (not yet
    known), "done" (names found), "bad" (refused) or "other" (neither TLS nor HTTP)."""
    if buf[:1] == b"\x16":
        if len(buf) >= 2 and buf[1] != 3:
            return "other", "tcp", []
        state, names = _tls_names(buf)
        return state, "tls", names
    data = buf.lstrip(b"\r\n")  # servers skip empty lines before a request
    first = data.split(b"\r\n", 1)[0]
    token = first.split(b" ", 1)[0]
    if _TOKEN.fullmatch(token) and b" " in first:
        state, names = _http_names(data)
        return state, "http", names
    if b" " not in first and b"\r\n" not in data and (not data or _TOKEN.fullmatch(data)):
        return "more", "http", []  # a method still arriving
    return "other", "tcp", []


def safe_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.lower().rstrip(".")[:253]
    return re.sub(r"[^a-z0-9._*-]", "?", name)


# ------------------------------------------------------------------ the open network
class OpenNetwork:
    """What the guard keeps for a guest whose network is simply on (no allow-list): the
    log -- every destination tried, named from the DNS answers it passed -- and the TCP
    connections passt is opening. passt 2023.03 spins on a second SYN or a RST of a
    connection it is opening, when both are in one of its reads: a resent SYN goes on only
    ``SYN_RESEND_SECONDS`` after the last (a kernel waits a second), a second SYN after
    passt answered, and a RST before passt answered, never (passt's SYN-ACK then gets the
    guest's RST on its own). Frames the guard would refuse here are only dropped: nothing
    is refused with a network that is on."""

    def __init__(self, log: EgressLog | None = None, clock=time.monotonic) -> None:
        self.log = log or EgressLog(None, None)
        self.clock = clock
        self.names: dict[bytes, str] = {}  # address -> a name an answer gave it (the log's)
        self.opening: dict[tuple[int, bytes, int], tuple[int, float]] = {}  # -> (seq, sent)
        self.lock = threading.Lock()  # the two directions run on two threads

    def name_of(self, addr: bytes) -> str | None:
        return self.names.get(addr)

    def outbound(self, frame: bytes, proto: int, l4: int, new_flow: bool) -> bool:
        """Whether a guest frame (past the host checks) may go to passt; logs attempts."""
        dst = bytes(frame[30:34])
        if proto == socket.IPPROTO_UDP:
            dport = struct.unpack_from("!H", frame, l4 + 2)[0]
            if dport == dns.DNS_PORT and (query := dns.parse_query(_payload(frame, l4 + 8))):
                self.log.record(safe_name(query.name), dst, dport, "dns", True)
            elif new_flow:
                self.log.record(self.name_of(dst), dst, dport, "udp", True)
            return True
        if proto == socket.IPPROTO_TCP:
            return self._tcp(frame, l4, dst)
        if proto == socket.IPPROTO_ICMP and new_flow:
            self.log.record(self.name_of(dst), dst, None, "icmp", True)
        return True

    def _tcp(self, frame: bytes, l4: int, dst: bytes) -> bool:
        sport, dport, seq = struct.unpack_from("!HHI", frame, l4)
        flags = frame[l4 + 13]
        key = (sport, dst, dport)
        now = self.clock()
        with self.lock:
            opening = self.opening.get(key)
            if not (flags & TCP_SYN and not flags & TCP_ACK):
                # a RST or another SYN of a connection passt has not answered: not now
                return opening is None or not flags & (TCP_RST | TCP_SYN)
            if opening is not None and now - opening[1] < SYN_RESEND_SECONDS:
                return False  # a SYN again, too soon after the last
            if opening is None and len(self.opening) >= MAX_OPENING:
                for k in [k for k, v in self.opening.items() if now - v[1] > OPENING_SECONDS]:
                    del self.opening[k]
                if len(self.opening) >= MAX_OPENING:
                    return False
            self.opening[key] = (seq, now)
        if opening is None:
            self.log.record(self.name_of(dst), dst, dport, "tcp", True)
        return True

    def inbound(self, frame: bytes, l4: int) -> None:
        """A frame passt sent the guest: a SYN-ACK ends an opening, a DNS answer names the
        addresses it gives (for the log)."""
        proto = frame[23]
        if proto == socket.IPPROTO_TCP and len(frame) >= l4 + 14:
            sport, dport = struct.unpack_from("!HH", frame, l4)
            if frame[l4 + 13] & (TCP_SYN | TCP_RST):  # answered (or refused)
                with self.lock:
                    self.opening.pop((dport, bytes(frame[26:30]), sport), None)
        elif proto == socket.IPPROTO_UDP and len(frame) >= l4 + 8:
            if struct.unpack_from("!H", frame, l4)[0] != dns.DNS_PORT:
                return
            answer = dns.parse_response(_payload(frame, l4 + 8))
            if answer is None:
                return
            name = safe_name(answer.name) or "?"
            with self.lock:
                for addr, _ttl, _owner in dns.chain_addresses(answer):
                    if len(self.names) >= MAX_NAMED:
                        self.names.clear()
                    self.names[addr] = name


def _payload(frame: bytes, start: int) -> bytes:
    total = struct.unpack_from("!H", frame, 16)[0]
    return bytes(frame[start : 14 + total])


def open_network(runtime: Path | None, clock=time.monotonic) -> OpenNetwork:
    """The guard's log and openings, logging to ``runtime`` (None: no log file)."""
    return OpenNetwork(EgressLog(runtime / LOG_FILE if runtime else None, None), clock)
