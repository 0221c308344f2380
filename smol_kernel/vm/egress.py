"""Egress by allow-list, and the egress log: the part of the network guard that knows names.

``Egress`` sits in ``netfilter.Policy`` after the host checks (which still drop anything
aimed at the host, loopback, link-local, metadata or multicast, whatever the list says).
With an allow-list (``allow_hosts``) it guarantees, per VM:

* DNS: a query to the guest's resolvers (``10.0.2.3``, or the ``dns_servers`` it was given)
  goes out only for a name the list covers; any other name gets NXDOMAIN from the guard at
  once. A response opens the A addresses of the question's name (directly or through its
  CNAME chain) for the record's TTL, clamped to ``MIN_TTL``..``MAX_TTL``, for the ports that
  name's entries give -- only for a query the guard let out (same guest port and id).
* A new TCP connection, UDP flow or ping to any other address is refused at once: TCP gets a
  reset, UDP an ICMP "administratively prohibited", so clients fail in milliseconds.
  Address and CIDR entries allow their ranges directly.
* A connection to an address opened by name is read until it shows where it is going: a TLS
  ClientHello must name an allowed host in its SNI, an HTTP request in its Host header;
  otherwise the connection is reset both ways before the bytes that complete the hello or
  the request head reach passt. At most ``MAX_INSPECT`` bytes are read; other protocols pass.

Without a list (``network=True``) nothing is refused here; the log is kept either way.
The log (``EgressLog``): one entry per destination and verdict (name if known, address,
port, protocol, count, first and last time), at most ``MAX_LOG_ENTRIES``, written as JSON
to the VM's runtime folder at most every ``LOG_INTERVAL`` seconds. Standard library only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

from . import dns
from .allowlist import AllowList, Ports, normalize_name, ports_ok

MIN_TTL = 30.0
MAX_TTL = 3600.0
MAX_OPEN_ADDRESSES = 4096
MAX_PENDING_QUERIES = 512
QUERY_TIMEOUT = 30.0
MAX_INSPECT = 16 * 1024
MAX_LOG_ENTRIES = 1024
LOG_INTERVAL = 0.2
LOG_FILE = "egress.json"
POLICY_FILE = "egress-policy.json"
HTTP_METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT",
                b"TRACE")  # fmt: skip
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
        now = time.monotonic()
        if not force and now - self.written < LOG_INTERVAL:
            return
        self.dirty, self.written = False, now
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
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
def _tls_sni(buf: bytes) -> tuple[str, str | None]:
    """("more" | "done" | "bad", sni) for a TLS record that should hold a ClientHello."""
    if len(buf) < 6:
        return "more", None
    if buf[5] != 1:
        return "bad", None  # the first handshake message of a client is its hello
    reclen = struct.unpack_from("!H", buf, 3)[0]
    complete = len(buf) >= 5 + reclen
    hello = buf[5 : 5 + reclen]
    need = "bad" if complete else "more"
    pos = 4 + 2 + 32  # handshake header, version, random
    try:
        pos += 1 + hello[pos]  # session id
        pos += 2 + struct.unpack_from("!H", hello, pos)[0]  # cipher suites
        pos += 1 + hello[pos]  # compression methods
        ext_end = pos + 2 + struct.unpack_from("!H", hello, pos)[0]
        pos += 2
        while pos + 4 <= min(ext_end, len(hello)):
            etype, elen = struct.unpack_from("!HH", hello, pos)
            pos += 4
            if etype == 0:
                data = hello[pos : pos + elen]
                if len(data) < elen:
                    return need, None
                if len(data) < 5 or data[2] != 0:
                    return "bad", None
                nlen = struct.unpack_from("!H", data, 3)[0]
                name = data[5 : 5 + nlen]
                if len(name) != nlen:
                    return "bad", None
                return "done", name.decode("latin-1")
            pos += elen
    except (IndexError, struct.error):
        return need, None
    return need, None  # no SNI (yet)


def _http_host(buf: bytes) -> tuple[str, str | None]:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return "more", None
    for line in buf[:end].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"host":
            host = value.strip().decode("latin-1")
            host = re.sub(r":\d+$", "", host)
            return "done", host
    return "bad", None


def classify(buf: bytes) -> tuple[str, str, str | None]:
    """(state, protocol, name) of the first bytes a client sent: state "more" (not yet
    known), "done" (name found), "bad" (must be refused) or "other" (another protocol)."""
    if buf[:1] == b"\x16":
        if len(buf) >= 2 and buf[1] != 3:
            return "other", "tcp", None
        state, name = _tls_sni(buf)
        return state, "tls", name
    word = buf.split(b" ", 1)[0]
    if word in HTTP_METHODS and b" " in buf:
        state, name = _http_host(buf)
        return state, "http", name
    if b" " not in buf and any(m.startswith(buf[:8]) for m in HTTP_METHODS):
        return "more", "http", None
    return "other", "tcp", None


def safe_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = normalize_name(name)[:253]
    return re.sub(r"[^a-z0-9._*-]", "?", name)


class _Opening:
    __slots__ = ("expiry", "names", "ports")

    def __init__(self) -> None:
        self.expiry = 0.0
        self.names: list[str] = []
        self.ports: list[Ports] = []


class _Inspect:
    __slots__ = ("buf", "next_seq")

    def __init__(self, next_seq: int) -> None:
        self.next_seq, self.buf = next_seq, b""


# ------------------------------------------------------------------ the policy
class Egress:
    """Allow-list decisions and the log for one VM (see the module docstring). Frames the
    guard must write back are queued on ``to_guest`` / ``to_passt``."""

    def __init__(self, allow: AllowList | None, resolvers: list[str],
                 log: EgressLog | None = None, clock=time.monotonic) -> None:  # fmt: skip
        self.allow = allow
        self.resolvers = {socket.inet_aton(r) for r in resolvers}
        self.log = log or EgressLog(None, None)
        self.clock = clock
        self.opened: dict[bytes, _Opening] = {}
        self.pending: dict[tuple[int, int], tuple[str, float]] = {}  # (guest port, id)
        self.inspect: dict[tuple[int, bytes, int], _Inspect] = {}
        self.to_guest: list[bytes] = []
        self.to_passt: list[bytes] = []
        self.lock = threading.Lock()  # the two directions run on two threads

    # -- names
    def name_of(self, addr: bytes) -> str | None:
        opening = self.opened.get(addr)
        return opening.names[0] if opening and opening.names else None

    def _destination(self, addr: bytes, port: int | None) -> str | None:
        """ "address" (an entry covers it), "name" (opened by a DNS answer), or None."""
        if self.allow is None:
            return "address"
        if self.allow.address_allowed(ipaddress.IPv4Address(addr), port):
            return "address"
        with self.lock:
            opening = self.opened.get(addr)
            if opening and opening.expiry > self.clock() and ports_ok(opening.ports, port):
                return "name"
        return None

    # -- guest -> passt
    def outbound(
        self, frame: bytes, proto: int, l4: int, new_flow: bool, known_tcp: bool = False
    ) -> bool:
        """Whether a guest frame (already past the host checks) may go to passt.
        ``new_flow``: it would open a UDP flow to a new peer / is a TCP SYN / an echo;
        ``known_tcp``: a TCP segment of a connection whose SYN the guard let through."""
        dst = bytes(frame[30:34])
        if proto == socket.IPPROTO_UDP:
            dport = struct.unpack_from("!H", frame, l4 + 2)[0]
            if dst in self.resolvers and dport == dns.DNS_PORT:
                return self._query(frame, l4)
            return self._udp(frame, dst, dport, new_flow)
        if proto == socket.IPPROTO_TCP:
            return self._tcp(frame, l4, dst, known_tcp)
        if proto == socket.IPPROTO_ICMP:
            allowed = self._destination(dst, None) is not None
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
        allowed = self.allow is None or self.allow.name_allowed(query.name)
        self.log.record(name, dst, dns.DNS_PORT, "dns", allowed)
        if not allowed:
            reply = udp_datagram(dst, bytes(frame[26:30]), dns.DNS_PORT, sport,
                                 dns.nxdomain(payload, query))  # fmt: skip
            self.to_guest.append(to_guest_frame(frame, socket.IPPROTO_UDP, reply))
            return False
        now = self.clock()
        with self.lock:
            if len(self.pending) >= MAX_PENDING_QUERIES:
                for key in [k for k, (_, t) in self.pending.items() if now - t > QUERY_TIMEOUT]:
                    del self.pending[key]
            if len(self.pending) >= MAX_PENDING_QUERIES:
                self.pending.pop(next(iter(self.pending)))
            self.pending[(sport, query.qid)] = (query.name, now)
        return True

    def _udp(self, frame: bytes, dst: bytes, dport: int, new_flow: bool) -> bool:
        allowed = self._destination(dst, dport) is not None
        if new_flow or not allowed:
            self.log.record(self.name_of(dst), dst, dport, "udp", allowed)
        if not allowed:
            self.to_guest.append(to_guest_frame(frame, socket.IPPROTO_ICMP, icmp_prohibited(frame)))
        return allowed

    def _tcp(self, frame: bytes, l4: int, dst: bytes, known: bool) -> bool:
        sport, dport, seq, ack = struct.unpack_from("!HHII", frame, l4)
        flags = frame[l4 + 13]
        key = (sport, dst, dport)
        if flags & TCP_SYN and not flags & TCP_ACK:
            kind = self._destination(dst, dport)
            self.log.record(self.name_of(dst), dst, dport, "tcp", kind is not None)
            if kind is None:
                self.to_guest.append(self._rst_to_guest(frame, sport, dport, 0, seq + 1))
                return False
            with self.lock:
                if kind == "name":
                    self.inspect[key] = _Inspect((seq + 1) & 0xFFFFFFFF)
                else:
                    self.inspect.pop(key, None)
            return True
        if flags & (TCP_FIN | TCP_RST):
            with self.lock:
                self.inspect.pop(key, None)
            return True
        state = self.inspect.get(key)
        if state is None:
            # A connection the guard let open, or the last segments of one it saw close;
            # nothing else (passt must not see segments for a flow it was never asked for).
            return known or self._destination(dst, dport) is not None
        payload = _payload(frame, l4 + (frame[l4 + 12] >> 4) * 4)
        if not payload:
            return True
        ahead = (seq - state.next_seq) & 0xFFFFFFFF
        if ahead:
            return ahead > 0x7FFFFFFF  # a retransmission passes, a gap waits for the rest
        state.buf += payload
        state.next_seq = (state.next_seq + len(payload)) & 0xFFFFFFFF
        verdict, proto, name = classify(state.buf)
        if verdict == "other":
            self.inspect.pop(key, None)
            return True
        if verdict == "more" and len(state.buf) <= MAX_INSPECT:
            return True
        ok = (
            verdict == "done"
            and name is not None
            and self.allow is not None
            and any(
                e.name_matches(normalize_name(name)) and e.port_ok(dport)
                for e in self.allow.entries
            )
        )
        self.inspect.pop(key, None)
        self.log.record(safe_name(name) or self.name_of(dst), dst, dport, proto, ok)
        if not ok:
            self.to_guest.append(self._rst_to_guest(frame, sport, dport, ack, 0, ack_flag=False))
            rst = tcp_segment(bytes(frame[26:30]), dst, sport, dport, seq, 0, TCP_RST)
            self.to_passt.append(bytes(frame[:14]) + _ipv4(bytes(frame[26:30]), dst,
                                                           socket.IPPROTO_TCP, rst))  # fmt: skip
        return ok

    def _rst_to_guest(self, frame: bytes, sport: int, dport: int, seq: int, ack: int,
                      ack_flag: bool = True) -> bytes:  # fmt: skip
        flags = TCP_RST | (TCP_ACK if ack_flag else 0)
        seg = tcp_segment(bytes(frame[30:34]), bytes(frame[26:30]), dport, sport, seq, ack, flags)
        return to_guest_frame(frame, socket.IPPROTO_TCP, seg)

    # -- passt -> guest
    def inbound_dns(self, frame: bytes, l4: int) -> None:
        """A resolver's answer: open the addresses of a name the guard let out."""
        dport = struct.unpack_from("!H", frame, l4 + 2)[0]
        answer = dns.parse_response(_payload(frame, l4 + 8))
        if answer is None:
            return
        with self.lock:
            asked = self.pending.pop((dport, answer.qid), None)
        if asked is None or normalize_name(asked[0]) != answer.name:
            return
        if self.allow is None:
            ports: list[Ports] = [None]
        else:
            ports = self.allow.name_ports(answer.name)
            if not ports:
                return
        now = self.clock()
        with self.lock:
            for addr, ttl, _owner in dns.chain_addresses(answer):
                opening = self.opened.get(addr)
                if opening is None:
                    if len(self.opened) >= MAX_OPEN_ADDRESSES:
                        for a in [a for a, o in self.opened.items() if o.expiry <= now]:
                            del self.opened[a]
                    if len(self.opened) >= MAX_OPEN_ADDRESSES:
                        continue
                    opening = self.opened[addr] = _Opening()
                expiry = now + min(max(float(ttl), MIN_TTL), MAX_TTL)
                if opening.expiry <= now:
                    opening.names, opening.ports = [], []
                opening.expiry = max(opening.expiry, expiry)
                name = safe_name(answer.name) or "?"
                if name not in opening.names and len(opening.names) < 8:
                    opening.names.append(name)
                for p in ports:
                    if p not in opening.ports and len(opening.ports) < 64:
                        opening.ports.append(p)

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
    return Egress(rules, list(config["resolvers"]), log, clock)
