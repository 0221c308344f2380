"""Egress by allow-list, and the egress log: the part of the network guard that knows names.

``Egress`` sits in ``netfilter.Policy`` after the host checks (which still drop anything
aimed at the host, loopback, link-local, metadata or multicast, whatever the list says).
With an allow-list (``allow_hosts``) it guarantees, per VM:

* DNS: a query (opcode QUERY) to the guest's resolvers (``10.0.2.3``, or the
  ``dns_servers`` it was given) goes out only for a name the list covers, with a fresh
  random id (so nobody who learns the guest's id can answer for the resolver); any other
  name gets NXDOMAIN from the guard at once. An answer to a query the guard let out opens
  the A addresses of the question's name (directly or through its CNAME chain) for the
  record's TTL, clamped to ``MIN_TTL``..``MAX_TTL``, for the ports that name's entries give,
  for TCP only -- and only globally routable addresses, unless ``private_answers`` lists
  the range (an allowed name pointed at a LAN address opens nothing).
* A new TCP connection, UDP flow or ping to any other destination is refused at once: TCP
  gets a reset, UDP an ICMP "administratively prohibited". Address and CIDR entries open
  their ranges for every protocol.
* A connection to an address opened by a name is read until it shows where it goes: a TLS
  ClientHello must name an allowed host in its SNI (and not hide one: encrypted client hello
  is refused), an HTTP request must name allowed hosts in its Host header and any absolute
  or CONNECT target. Other protocols pass only on a port a name entry lists explicitly
  (``git.example.com:22``). A refused connection is reset both ways before the segment that
  completes what was read reaches passt. The guard follows the stream as passt does: frames
  passt would drop are dropped, segments must continue the stream in order, and the first
  ``MAX_INSPECT`` bytes can never be sent again with other content (so passt cannot be made
  to see another stream than the guard read).

Without a list (``network=True``) nothing is refused here; the log is kept either way.
The log (``EgressLog``): one entry per destination and verdict (name if known, address,
port, protocol, count, first and last time), at most ``MAX_LOG_ENTRIES``, written as JSON
to the VM's runtime folder at most every ``LOG_INTERVAL`` seconds (at once for a newly
refused destination). Standard library only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import socket
import struct
import threading
import time
from pathlib import Path

from . import dns
from .allowlist import AllowList, Ports, normalize_name, ports_ok, valid_name

MIN_TTL = 30.0
MAX_TTL = 3600.0
MAX_OPEN_ADDRESSES = 4096
MAX_PENDING_QUERIES = 512
QUERY_TIMEOUT = 30.0
HIDDEN_NAME_EXTENSIONS = frozenset({0xFE08, 0xFE09, 0xFE0A, 0xFE0B, 0xFE0C, 0xFE0D, 0xFFCE})
SYN_RESEND_SECONDS = 0.5  # Linux resends a SYN after 1 s
QUIET_SECONDS = 10.0  # an inspected stream gone from the flow table this long is forgotten
MAX_AHEAD = 16 << 20  # bytes past passt's position a guest segment may start (its window)
MAX_INSPECT = 16 * 1024
MAX_LOG_ENTRIES = 1024
LOG_INTERVAL = 0.2
LOG_FILE = "egress.json"
POLICY_FILE = "egress-policy.json"
MAX_INSPECTED_FLOWS = 256  # the guard's own TCP flow cap (netfilter.MAX_TCP_FLOWS)
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


# ------------------------------------------------------------------ frames the guard writes
def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                       src, dst)  # fmt: skip
    return head[:10] + struct.pack("!H", _checksum(head)) + head[12:] + payload


def _l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    return _checksum(src + dst + struct.pack("!BBH", 0, proto, len(segment)) + segment)


def to_guest_frame(frame: bytes, proto: int, l4: bytes) -> bytes:
    """A frame from the guest frame's destination back to the guest."""
    guest, remote = bytes(frame[26:30]), bytes(frame[30:34])
    return bytes(frame[6:12]) + bytes(frame[0:6]) + b"\x08\x00" + _ipv4(remote, guest, proto, l4)


def tcp_segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
                flags: int) -> bytes:  # fmt: skip
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50,
                      flags, 0, 0, 0)  # fmt: skip
    csum = _l4_checksum(src, dst, socket.IPPROTO_TCP, seg)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def udp_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = _l4_checksum(src, dst, socket.IPPROTO_UDP, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


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


class _Opening:
    __slots__ = ("expiry", "names", "ports")

    def __init__(self) -> None:
        self.expiry = 0.0
        self.names: list[str] = []
        self.ports: list[Ports] = []


class _Inspect:
    """A TCP stream to a name-opened address: its first ``MAX_INSPECT`` bytes as passt will
    see them, and where passt is in it. ``acked``: the stream offset passt has acknowledged
    (what it took), learnt from its own segments, never from the guest's; ``answered``:
    passt's SYN-ACK for this very ISN arrived (no data flows before it: a connection passt
    still holds from an earlier stream on the tuple never sends one)."""

    __slots__ = ("acked", "answered", "buf", "decided", "eth", "guest", "last", "start")

    def __init__(self, start: int, eth: bytes, guest: bytes, now: float) -> None:
        self.start, self.eth, self.guest, self.last = start, eth, guest, now
        self.buf, self.decided, self.acked, self.answered = b"", False, 0, False

    def offset(self, seq: int) -> int:
        """The stream offset of ``seq``, unwrapped around passt's position."""
        delta = (seq - self.start - self.acked) & 0xFFFFFFFF
        return self.acked + (delta - (1 << 32) if delta & 0x80000000 else delta)

    def passt_said(self, flags: int, ack: int, now: float) -> None:
        """A segment passt sent the guest on this stream (the passt -> guest thread)."""
        self.last = now
        if flags & TCP_SYN and flags & TCP_ACK:
            self.answered = self.answered or ack == self.start
        elif flags & TCP_ACK and self.answered:
            off = self.offset(ack)
            if self.acked < off <= self.acked + MAX_AHEAD:
                self.acked = off


# ------------------------------------------------------------------ the policy
class Egress:
    """Allow-list decisions and the log for one VM (see the module docstring). Frames the
    guard must write back are queued on ``to_guest`` / ``to_passt``; a frame to forward
    changed (a DNS id) is left in ``rewritten`` / ``rewritten_in``."""

    def __init__(
        self,
        allow: AllowList | None,
        resolvers: list[str],
        log: EgressLog | None = None,
        clock=time.monotonic,
        private_answers: list[str] = (),  # type: ignore[assignment]
    ) -> None:
        self.allow = allow
        self.resolvers = {socket.inet_aton(r) for r in resolvers}
        self.private_answers = [ipaddress.IPv4Network(n, strict=False) for n in private_answers]
        self.log = log or EgressLog(None, None)
        self.clock = clock
        self.opened: dict[bytes, _Opening] = {}
        # (guest port, id sent) -> (name, id the guest used, when)
        self.pending: dict[tuple[int, int], tuple[str, int, float]] = {}
        self.inspect: dict[tuple[int, bytes, int], _Inspect] = {}
        self.tcp_flows: dict = {}  # the Policy's, shared: a flow reset here leaves it
        self.to_guest: list[bytes] = []
        self.to_passt: list[bytes] = []
        self.rewritten: bytes | None = None  # guest -> passt thread
        self.rewritten_in: bytes | None = None  # passt -> guest thread
        self.lock = threading.Lock()  # the two directions run on two threads

    # -- names
    def name_of(self, addr: bytes) -> str | None:
        with self.lock:
            opening = self.opened.get(addr)
            return opening.names[0] if opening is not None and opening.names else None

    def _destination(self, addr: bytes, port: int | None, tcp: bool = True) -> str | None:
        """ "address" (an entry covers it), "name" (opened by a DNS answer: TCP only), or
        None."""
        if self.allow is None:
            return "address"
        if self.allow.address_allowed(ipaddress.IPv4Address(addr), port):
            return "address"
        if not tcp:
            return None
        with self.lock:
            opening = self.opened.get(addr)
            if opening and opening.expiry > self.clock() and ports_ok(opening.ports, port):
                return "name"
        return None

    def _names_allowed(self, names: Named, port: int) -> bool:
        """Every name allowed, for its own port (a CONNECT target) or the connection's."""
        assert self.allow is not None
        return bool(names) and all(
            any(e.name_matches(n) and e.port_ok(p or port) for e in self.allow.entries)
            for n, p in names
        )

    def _port_listed(self, addr: bytes, port: int) -> bool:
        """Does a name entry that opened ``addr`` list ``port`` explicitly?"""
        assert self.allow is not None
        with self.lock:
            opening = self.opened.get(addr)
            names = list(opening.names) if opening is not None else []
        return any(e.ports is not None and e.port_ok(port) and e.name_matches(n)
                   for n in names for e in self.allow.entries)  # fmt: skip

    # -- guest -> passt
    def outbound(
        self, frame: bytes, proto: int, l4: int, new_flow: bool, known_tcp: bool = False
    ) -> bool:
        """Whether a guest frame (already past the host checks) may go to passt.
        ``new_flow``: it would open a UDP flow to a new peer / is a TCP SYN / an echo;
        ``known_tcp``: a TCP segment of a connection whose SYN the guard let through.
        (``rewritten`` is cleared per frame by ``Policy.allow_frame``, which every frame
        passes, ARP included.)"""
        dst = bytes(frame[30:34])
        if proto == socket.IPPROTO_UDP:
            dport = struct.unpack_from("!H", frame, l4 + 2)[0]
            if dst in self.resolvers and dport == dns.DNS_PORT:
                return self._query(frame, l4)
            return self._udp(frame, dst, dport, new_flow)
        if proto == socket.IPPROTO_TCP:
            return self._tcp(frame, l4, dst, known_tcp)
        if proto == socket.IPPROTO_ICMP:
            allowed = self._destination(dst, None, tcp=False) is not None
            if new_flow or not allowed:
                self.log.record(self.name_of(dst), dst, None, "icmp", allowed)
            return allowed
        return self.allow is None

    def _query(self, frame: bytes, l4: int) -> bool:
        sport = struct.unpack_from("!H", frame, l4)[0]
        payload = _payload(frame, l4 + 8)
        query = dns.parse_query(payload)
        dst = bytes(frame[30:34])
        if query is None:
            self.log.record(None, dst, dns.DNS_PORT, "dns", self.allow is None)
            return self.allow is None
        name = safe_name(query.name)
        allowed = self.allow is None or (query.opcode == 0 and self.allow.name_allowed(query.name))
        self.log.record(name, dst, dns.DNS_PORT, "dns", allowed)
        if not allowed:
            reply = udp_datagram(dst, bytes(frame[26:30]), dns.DNS_PORT, sport,
                                 dns.nxdomain(payload, query))  # fmt: skip
            self.to_guest.append(to_guest_frame(frame, socket.IPPROTO_UDP, reply))
            return False
        sent_id = query.qid
        if self.allow is not None:
            # A fresh id the guest never sees: only the resolver can answer (the UDP
            # checksum is left out -- zero means none in IPv4 -- as the payload changed).
            sent_id = secrets.randbelow(1 << 16)
            start = l4 + 8
            self.rewritten = (bytes(frame[: l4 + 6]) + b"\0\0" + struct.pack("!H", sent_id)
                              + bytes(frame[start + 2 :]))  # fmt: skip
        now = self.clock()
        with self.lock:
            if len(self.pending) >= MAX_PENDING_QUERIES:
                for key in [k for k, v in self.pending.items() if now - v[2] > QUERY_TIMEOUT]:
                    del self.pending[key]
            if len(self.pending) >= MAX_PENDING_QUERIES:
                self.pending.pop(next(iter(self.pending)))
            self.pending[(sport, sent_id)] = (query.name, query.qid, now)
        return True

    def _udp(self, frame: bytes, dst: bytes, dport: int, new_flow: bool) -> bool:
        allowed = self._destination(dst, dport, tcp=False) is not None
        if new_flow or not allowed:
            self.log.record(self.name_of(dst), dst, dport, "udp", allowed)
        if not allowed:
            self.to_guest.append(to_guest_frame(frame, socket.IPPROTO_ICMP, icmp_prohibited(frame)))
        return allowed

    def _tcp(self, frame: bytes, l4: int, dst: bytes, known: bool) -> bool:
        sport, dport, seq, ack = struct.unpack_from("!HHII", frame, l4)
        flags, doff = frame[l4 + 13], (frame[l4 + 12] >> 4) * 4
        if doff < 20 or l4 + doff > len(frame):
            return False  # passt would not read it as this guard does
        key = (sport, dst, dport)
        state = self.inspect.get(key)
        if flags & TCP_SYN and l4 + doff < len(frame) and self.allow is not None:
            return False  # data on a SYN (TCP Fast Open, which passt never offers) is unread
        if flags & TCP_SYN and not flags & TCP_ACK:
            return self._syn(frame, key, seq, state)
        if state is None:
            # Streams to name-opened addresses keep their state for their whole life; a
            # segment with none belongs to an address entry's flow, or to nothing passt
            # should see.
            return self._destination(dst, dport) == "address"
        if flags & TCP_SYN:
            return False
        state.last = self.clock()
        if not state.answered:
            return False  # nothing but its SYN before passt answered it
        payload = bytes(frame[l4 + doff :])
        if flags & TCP_RST:
            if payload:
                return False  # data on a reset: nothing a stream should carry; state stays
            self._forget(key, state, reset_passt=False)
            return True
        verdict = self._stream(state, seq, payload, dport, dst)
        if verdict is None:
            return True
        if verdict == "drop":
            return False
        self._refuse(frame, key, seq, ack, dport, dst, verdict)
        return False

    def _syn(self, frame: bytes, key, seq: int, state: _Inspect | None) -> bool:
        sport, dst, dport = key
        if state is not None:
            if state.start == (seq + 1) & 0xFFFFFFFF and not state.buf:
                # The same SYN again: passt (2023.03) loops on two frames of a connection it
                # is opening in one read, so resends are spaced as a kernel spaces them.
                now = self.clock()
                if state.answered or now - state.last < SYN_RESEND_SECONDS:
                    return False
                state.last = now
                return True
            if key in self.tcp_flows:
                return False  # a second SYN on a live stream
            # The tuple again, after its stream closed: forget the old one (passt ignores a
            # SYN on a connection it still holds, and then never answers this ISN).
            self._forget(key, state, reset_passt=True)
        kind = self._destination(dst, dport)
        if kind == "name" and not self._room_to_inspect():
            kind = None
        self.log.record(self.name_of(dst), dst, dport, "tcp", kind is not None)
        if kind is None:
            self.to_guest.append(self._rst_to_guest(frame, sport, dport, 0, seq + 1))
            return False
        if kind == "name":
            self.inspect[key] = _Inspect((seq + 1) & 0xFFFFFFFF, bytes(frame[:14]),
                                         bytes(frame[26:30]), self.clock())  # fmt: skip
        return True

    def _room_to_inspect(self) -> bool:
        """Room for one more inspected stream: streams the guard's flow table no longer has
        and that have been quiet for ``QUIET_SECONDS`` (a half-closed download still moves)
        are forgotten, and reset on both sides. None such: the new stream is refused."""
        if len(self.inspect) >= MAX_INSPECTED_FLOWS:
            now = self.clock()
            for key, state in list(self.inspect.items()):
                if key not in self.tcp_flows and now - state.last >= QUIET_SECONDS:
                    self._forget(key, state, reset_passt=True)
        return len(self.inspect) < MAX_INSPECTED_FLOWS

    def _forget(self, key, state: _Inspect, reset_passt: bool) -> None:
        self.inspect.pop(key, None)
        self.tcp_flows.pop(key, None)
        if reset_passt:
            sport, dst, dport = key
            seq = (state.start + state.acked) & 0xFFFFFFFF
            rst = tcp_segment(state.guest, dst, sport, dport, seq, 0, TCP_RST)
            self.to_passt.append(state.eth + _ipv4(state.guest, dst, socket.IPPROTO_TCP, rst))
            back = tcp_segment(dst, state.guest, dport, sport, 0, seq, TCP_RST | TCP_ACK)
            eth = state.eth[6:12] + state.eth[0:6] + state.eth[12:14]
            self.to_guest.append(eth + _ipv4(dst, state.guest, socket.IPPROTO_TCP, back))

    def passt_segment(self, frame: bytes, l4: int) -> None:
        """A TCP segment passt sent the guest: how far passt is in an inspected stream."""
        (dport,) = struct.unpack_from("!H", frame, l4 + 2)
        key = (dport, bytes(frame[26:30]), struct.unpack_from("!H", frame, l4)[0])
        state = self.inspect.get(key)
        if state is not None:
            state.passt_said(frame[l4 + 13], struct.unpack_from("!I", frame, l4 + 8)[0],
                             self.clock())  # fmt: skip

    def _stream(self, state: _Inspect, seq: int, payload: bytes, port: int, dst: bytes):
        """None: pass; "drop": not this segment (the guest resends); else the protocol of
        a refusal (the connection is reset)."""
        if not payload:
            return None
        if not state.answered:
            return "drop"  # no data before passt answered this stream's own SYN
        off = state.offset(seq)
        if off < 0 or off > state.acked + MAX_AHEAD:
            return "drop"  # before the stream, or beyond any window passt offers
        if off > len(state.buf) and (not state.decided or len(state.buf) < MAX_INSPECT):
            return "drop"  # a gap in what the guard must read: the guest resends
        overlap = state.buf[off : off + len(payload)] if off < len(state.buf) else b""
        if payload[: len(overlap)] != overlap:
            return "drop"  # other bytes where the guard already read some
        new = payload[len(overlap) :] if off <= len(state.buf) else b""
        if state.decided:
            state.buf += new[: max(0, MAX_INSPECT - len(state.buf))]
            return None
        state.buf += new
        verdict, proto, names = classify(state.buf)
        if verdict == "more" and len(state.buf) <= MAX_INSPECT:
            return None
        assert self.allow is not None
        if verdict == "done":
            ok = self._names_allowed(names, port)
        else:
            ok = verdict == "other" and self._port_listed(dst, port)
        shown = safe_name(names[0][0]) if names else self.name_of(dst)
        self.log.record(shown, dst, port, proto, ok)
        state.buf = state.buf[:MAX_INSPECT]
        if ok:
            state.decided = True
            return None
        return proto

    def _refuse(self, frame: bytes, key, seq: int, ack: int, dport: int, dst: bytes,
                proto: str) -> None:  # fmt: skip
        sport = key[0]
        state = self.inspect.get(key)
        if state is not None:
            self._forget(key, state, reset_passt=False)
        self.to_guest.append(self._rst_to_guest(frame, sport, dport, ack, 0, ack_flag=False))
        guest = bytes(frame[26:30])
        rst = tcp_segment(guest, dst, sport, dport, seq, 0, TCP_RST)
        self.to_passt.append(bytes(frame[:14]) + _ipv4(guest, dst, socket.IPPROTO_TCP, rst))

    def _rst_to_guest(self, frame: bytes, sport: int, dport: int, seq: int, ack: int,
                      ack_flag: bool = True) -> bytes:  # fmt: skip
        flags = TCP_RST | (TCP_ACK if ack_flag else 0)
        seg = tcp_segment(bytes(frame[30:34]), bytes(frame[26:30]), dport, sport, seq, ack, flags)
        return to_guest_frame(frame, socket.IPPROTO_TCP, seg)

    # -- passt -> guest
    def inbound_dns(self, frame: bytes, l4: int) -> bool:
        """A resolver's answer: open the addresses of a name the guard let out. False: not
        an answer to a query it let out (with an allow-list: not for the guest)."""
        self.rewritten_in = None
        dport = struct.unpack_from("!H", frame, l4 + 2)[0]
        answer = dns.parse_response(_payload(frame, l4 + 8))
        if answer is None:
            return self.allow is None
        with self.lock:
            asked = self.pending.get((dport, answer.qid))
            if asked is not None and normalize_name(asked[0]) == answer.name:
                del self.pending[(dport, answer.qid)]
            else:
                asked = None
        if asked is None:
            return self.allow is None
        if self.allow is None:
            ports: list[Ports] = [None]
        else:
            ports = self.allow.name_ports(answer.name)
            start = l4 + 8  # the guest gets back the id it used
            self.rewritten_in = (bytes(frame[: l4 + 6]) + b"\0\0" + struct.pack("!H", asked[1])
                                 + bytes(frame[start + 2 :]))  # fmt: skip
        now = self.clock()
        name = safe_name(answer.name) or "?"
        for addr, ttl, _owner in dns.chain_addresses(answer):
            if self.allow is not None and not self._answer_may_open(addr):
                self.log.record(name, addr, None, "dns-answer", False)
                continue
            with self.lock:
                self._open(addr, now + min(max(float(ttl), MIN_TTL), MAX_TTL), name, ports, now)
        return True

    def _answer_may_open(self, addr: bytes) -> bool:
        ip = ipaddress.IPv4Address(addr)
        return ip.is_global or any(ip in net for net in self.private_answers)

    def _open(self, addr: bytes, expiry: float, name: str, ports: list[Ports], now: float):
        opening = self.opened.get(addr)
        if opening is None:
            if len(self.opened) >= MAX_OPEN_ADDRESSES:
                for a in [a for a, o in self.opened.items() if o.expiry <= now]:
                    del self.opened[a]
            if len(self.opened) >= MAX_OPEN_ADDRESSES:
                return
            opening = self.opened[addr] = _Opening()
        if opening.expiry <= now:
            opening.names, opening.ports = [], []
        opening.expiry = max(opening.expiry, expiry)
        if name not in opening.names and len(opening.names) < 8:
            opening.names = [*opening.names, name]
        for p in ports:
            if p not in opening.ports and len(opening.ports) < 64:
                opening.ports = [*opening.ports, p]

    def is_resolver(self, addr: bytes) -> bool:
        return addr in self.resolvers


def _payload(frame: bytes, start: int) -> bytes:
    total = struct.unpack_from("!H", frame, 16)[0]
    return bytes(frame[start : 14 + total])


def load(runtime: Path, clock=time.monotonic) -> Egress:
    """The egress policy ``network.start_network`` wrote for this VM, logging next to it."""
    config = json.loads((runtime / POLICY_FILE).read_text())
    allow = config.get("allow_hosts")
    rules = AllowList.parse(allow) if allow else None
    log = EgressLog(runtime / LOG_FILE, allow or None)
    return Egress(rules, list(config["resolvers"]), log, clock,
                  list(config.get("private_answers", [])))  # fmt: skip
