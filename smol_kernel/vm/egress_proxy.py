"""The host's end of an allow-listed guest's network: every connection terminated on the host.

A kernel with ``allow_hosts`` has no passt. Its network device is connected to this helper
(one process per VM, standard library only, run as ``python -I``), which plays the guest's
gateway and resolver with a small TCP/IP endpoint of its own, so nothing the guest sends
ever leaves the host as it sent it. What it guarantees:

* **Names.** The guest's DNS queries (to 10.0.2.3, UDP) are answered here: a name the list
  does not cover gets NXDOMAIN; a covered name is resolved by the host first (``Resolver``:
  a random source port, a random id and 0x20 case randomisation, the answer's question
  checked byte for byte), and, if it has an address the host would connect to, the guest
  gets a *synthetic* address for it (from ``SYNTH_NET``, 198.18.0.0/15, one per name, kept
  per kernel across rewinds). The guest never learns a real address from a name.
* **Connections.** A TCP connection the guest opens is accepted by this endpoint, never
  forwarded. To a synthetic address: the port must be one the name's entries allow; the
  first bytes are read and judged -- a TLS ClientHello must name this very host in its SNI
  (no encrypted client hello), every HTTP/1 request on the connection must name it in its
  Host header (and in an absolute or CONNECT target) -- then the host resolves the name
  itself and connects to one of its addresses (global ones, or ones in
  ``private_answer_ranges``) and splices the two streams. Other protocols only on a port a
  name entry lists explicitly, where the host connects at the SYN (servers that speak
  first work). To an address: only an address or CIDR entry with the port opens it, and
  the host connects at the SYN. Nothing the guest sent reaches a remote before its
  verdict, in any protocol: not one byte.
* **Refusals are fast and logged.** A refused connection gets a reset at once (or when
  its first bytes are judged), other UDP and ICMP an ICMP "administratively prohibited";
  each goes to the egress log (``egress.EgressLog``) with the allowed ones.
* **Never the host.** Loopback, link-local, multicast, the host's own addresses and known
  metadata endpoints are never connected to, whatever the list says (``netfilter.Policy``'s
  checks, reused); DNS answers that point there open nothing.
* **Bounded.** At most ``MAX_CONNECTIONS`` connections, ``MAX_INSPECT`` bytes held before a
  verdict, ``WINDOW`` bytes buffered per direction per connection, ``HANDSHAKE_SECONDS`` for
  the guest's handshake and ``VERDICT_SECONDS`` for its first bytes, ``CONNECT_SECONDS``
  for the host's connect; guest frames are paced (``netfilter.Pacer``).

The TCP endpoint is small on purpose: the link to the VM is a socket (no loss, no
reordering; QEMU holds frames while the guest's ring is full), so it never sends options
but MSS and window scale, keeps no out-of-order data, and resends only after a second
without progress. UDP other than DNS and QUIC are refused: clients fall back to TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import re
import socket
import struct
import sys
import time
from pathlib import Path

from . import dns
from .allowlist import AllowList, check_cidr, normalize_name, ports_ok, valid_name
from .egress import LOG_FILE, POLICY_FILE, EgressLog, classify, icmp_prohibited, safe_name
from .netfilter import (
    DNS,
    ETH_ARP,
    ETH_IPV4,
    GATEWAY,
    GUEST_ADDR,
    GUEST_MAC_BYTES,
    MAX_FRAME,
    MAX_GUEST_FRAME,
    Pacer,
    Policy,
)

SYNTH_NET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544: never a real destination
MAX_NAMES = 4096
NAMES_FILE = "egress-names.json"
HOST_MAC = bytes.fromhex("525400123502")
MAX_CONNECTIONS = 128
MAX_INSPECT = 16 << 10
WINDOW = 256 << 10  # bytes buffered per direction per connection
MSS = 1460
HANDSHAKE_SECONDS = 10.0
VERDICT_SECONDS = 10.0
CONNECT_SECONDS = 10.0
RESEND_SECONDS = 1.0
IDLE_SECONDS = 3600.0
DNS_TTL = 30  # what the guest is told; the host's own answers are cached for their TTL
MIN_CACHE, MAX_CACHE = 30.0, 3600.0
RESOLVE_SECONDS = 3.0
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_GUEST = socket.inet_aton(GUEST_ADDR)
_DNS = socket.inet_aton(DNS)
_HOSTS_LINE = re.compile(r"^\s*nameserver\s+([0-9.]+)\s*$")


# ------------------------------------------------------------------ wire helpers
def checksum(data: bytes | bytearray) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(memoryview(data).cast("H"))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return socket.htons(~total & 0xFFFF)


def ipv4_frame(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    head = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64,
                                 proto, 0, src, dst))  # fmt: skip
    head[10:12] = struct.pack("!H", checksum(head))
    return GUEST_MAC_BYTES + HOST_MAC + b"\x08\x00" + bytes(head) + payload


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    return checksum(src + dst + struct.pack("!BBH", 0, proto, len(segment)) + segment)


def tcp_frame(src: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
              window: int, payload: bytes = b"", options: bytes = b"") -> bytes:  # fmt: skip
    offset = (20 + len(options)) // 4
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                                offset << 4, flags, min(window, 0xFFFF), 0, 0))  # fmt: skip
    seg += options + payload
    seg[16:18] = struct.pack("!H", l4_checksum(src, _GUEST, socket.IPPROTO_TCP, bytes(seg)))
    return ipv4_frame(src, _GUEST, socket.IPPROTO_TCP, bytes(seg))


def udp_frame(src: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    seg[6:8] = struct.pack("!H", l4_checksum(src, _GUEST, socket.IPPROTO_UDP, bytes(seg)) or 0xFFFF)
    return ipv4_frame(src, _GUEST, socket.IPPROTO_UDP, bytes(seg))


def arp_reply(frame: bytes) -> bytes | None:
    """Our answer to the guest's "who has 10.0.2.2 / 10.0.2.3" (None for anything else)."""
    if len(frame) < 42 or frame[20:22] != b"\x00\x01":
        return None
    target = bytes(frame[38:42])
    if socket.inet_ntoa(target) not in (GATEWAY, DNS):
        return None
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IPV4, 6, 4, 2, HOST_MAC, target,
                       bytes(frame[22:28]), bytes(frame[28:32]))  # fmt: skip
    return bytes(frame[6:12]) + HOST_MAC + b"\x08\x06" + body


def tcp_options(data: bytes) -> tuple[int, int | None]:
    """(MSS, window scale or None) of a SYN's options."""
    mss, wscale, at = 536, None, 0
    while at < len(data):
        kind = data[at]
        if kind == 0:
            break
        if kind == 1:
            at += 1
            continue
        if at + 1 >= len(data) or data[at + 1] < 2:
            break
        size = data[at + 1]
        if kind == 2 and size == 4 and at + 4 <= len(data):
            mss = struct.unpack_from("!H", data, at + 2)[0]
        elif kind == 3 and size == 3 and at + 3 <= len(data):
            wscale = min(data[at + 2], 14)
        at += size
    return max(mss, 64), wscale


_REQUEST_LINE = re.compile(rb"[A-Za-z]{1,20} \S{1,8192} HTTP/1\.[01]")


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
        return "more" if len(body) < 8192 and re.fullmatch(rb"[A-Za-z]{0,20}( \S*)?", body) \
            else "tcp"  # fmt: skip
    return "http" if _REQUEST_LINE.fullmatch(body[:end]) else "tcp"


# ------------------------------------------------------------------ the host's resolver
def host_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    return [m.group(1) for line in lines if (m := _HOSTS_LINE.match(line))]


def _query(name: str, qid: int) -> bytes:
    """An A query for ``name`` with every letter's case drawn at random (0x20)."""
    out = bytearray(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0))
    for label in name.split("."):
        mixed = "".join(c.upper() if c.isalpha() and random.getrandbits(1) else c for c in label)
        out += bytes((len(mixed),)) + mixed.encode("ascii")
    return bytes(out + b"\x00" + struct.pack("!HH", dns.TYPE_A, dns.CLASS_IN))


class Resolver:
    """Resolves names for the host's connections (and to decide the guest's answers),
    caching each answer for its TTL (clamped). A response counts only from the server asked,
    on the socket (random port) the query left from, with its id and its question byte for
    byte, case included: a forger must guess port, id and case."""

    def __init__(self, servers: list[str]) -> None:
        self.servers = servers
        self.cache: dict[str, tuple[float, list[tuple[bytes, int]]]] = {}

    async def resolve(self, name: str) -> list[bytes]:
        """The name's A addresses (through its CNAME chain), [] if none or no answer."""
        now = time.monotonic()
        if (hit := self.cache.get(name)) is not None and hit[0] > now:
            return [a for a, _ in hit[1]]
        for server in self.servers:
            try:
                found = await asyncio.wait_for(self._ask(server, name), RESOLVE_SECONDS)
            except (OSError, TimeoutError, asyncio.TimeoutError):
                continue
            if found is not None:
                ttl = min((t for _, t in found), default=MIN_CACHE)
                self.cache[name] = (now + min(max(ttl, MIN_CACHE), MAX_CACHE), found)
                if len(self.cache) > MAX_NAMES:
                    self.cache.pop(next(iter(self.cache)))
                return [a for a, _ in found]
        return []

    async def _ask(self, server: str, name: str) -> list[tuple[bytes, int]] | None:
        loop = asyncio.get_running_loop()
        qid = random.getrandbits(16)
        query = _query(name, qid)
        question = query[12:]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((server, dns.DNS_PORT))  # the kernel drops datagrams from others
            await loop.sock_sendall(sock, query)
            while True:
                data = await loop.sock_recv(sock, 4096)
                if len(data) < 12 or struct.unpack_from("!H", data)[0] != qid:
                    continue
                if not data.startswith(question, 12) and data[12 : 12 + len(question)] != question:
                    continue
                answer = dns.parse_response(data)
                if answer is None:
                    continue
                if answer.rcode != 0:
                    return []
                return [(a, t) for a, t, _ in dns.chain_addresses(answer)]


# ------------------------------------------------------------------ names the guest knows
class Names:
    """Each allowed name the guest resolved and its synthetic address, kept in the kernel's
    folder so a rewound VM's connections still mean the same names."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.by_name: dict[str, bytes] = {}
        self.by_addr: dict[bytes, str] = {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            for name, addr in json.loads(path.read_text()).items():  # type: ignore[union-attr]
                packed = socket.inet_aton(addr)
                if valid_name(name) and ipaddress.IPv4Address(addr) in SYNTH_NET:
                    self.by_name[name], self.by_addr[packed] = packed, name

    def address(self, name: str) -> bytes | None:
        if (addr := self.by_name.get(name)) is not None:
            return addr
        if len(self.by_name) >= MAX_NAMES:
            return None
        addr = (SYNTH_NET.network_address + 1 + len(self.by_name)).packed
        self.by_name[name], self.by_addr[addr] = addr, name
        if self.path is not None:
            table = {n: socket.inet_ntoa(a) for n, a in self.by_name.items()}
            tmp = self.path.with_suffix(".tmp")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(table))
                os.replace(tmp, self.path)
        return addr

    def name(self, addr: bytes) -> str | None:
        return self.by_addr.get(addr)


# ------------------------------------------------------------------ HTTP requests, one by one
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


# ------------------------------------------------------------------ one guest connection
class Conn:
    """One TCP connection the guest opened, terminated here (see the module doc)."""

    def __init__(self, proxy: EgressProxy, key: tuple, dst: bytes, dport: int, gport: int,
                 guest_seq: int, mss: int, wscale: int | None) -> None:  # fmt: skip
        self.proxy, self.key = proxy, key
        self.dst, self.dport, self.gport = dst, dport, gport
        self.rcv_nxt = (guest_seq + 1) & 0xFFFFFFFF
        self.iss = random.getrandbits(32)
        self.snd_una = self.snd_nxt = (self.iss + 1) & 0xFFFFFFFF
        self.mss = min(mss, MSS)
        self.wscale = wscale  # None: the guest offered none, so neither side scales
        self.guest_window = 0
        self.state = "syn"  # syn (answered, or connecting first) | open | closed
        self.name = proxy.names.name(dst)
        self.judged = self.name is None  # bytes to an address entry pass unread
        self.inbound = bytearray()  # from the guest, not yet judged or sent on
        self.outbound = bytearray()  # from the remote, not yet acknowledged by the guest
        self.http: HttpRequests | None = None
        self.protocol = "tcp"
        self.remote: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.remote_eof = self.guest_fin = self.fin_sent = self.remote_shut = False
        self.born = self.progress = time.monotonic()
        self.space = asyncio.Event()
        self.space.set()
        self.tasks: set[asyncio.Task] = set()

    def start(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- to the guest
    def window(self) -> int:
        held = len(self.inbound) + (len(self.http.pending) if self.http else 0)
        return max(0, (WINDOW if self.judged else MAX_INSPECT) - held)

    def send(self, flags: int, payload: bytes = b"", seq: int | None = None,
             options: bytes = b"") -> None:  # fmt: skip
        seq = self.snd_nxt if seq is None else seq
        frame = tcp_frame(self.dst, self.dport, self.gport, seq, self.rcv_nxt, flags,
                          self.window(), payload, options)  # fmt: skip
        self.proxy.to_guest(frame)

    def syn_ack(self) -> None:
        options = struct.pack("!BBH", 2, 4, MSS)
        if self.wscale is not None:
            options += b"\x01\x03\x03\x00"  # NOP, window scale 0: the guest's may scale
        self.send(SYN | ACK, seq=self.iss, options=options)

    def reset(self) -> None:
        if self.state != "closed":
            self.send(RST | ACK)
        self.close()

    def close(self) -> None:
        self.state = "closed"
        self.proxy.conns.pop(self.key, None)
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        if self.remote is not None:
            self.remote[1].close()
        self.space.set()

    def push(self) -> None:
        """Send what the guest's window takes of the remote's bytes, then a FIN if done."""
        flight = (self.snd_nxt - self.snd_una) & 0xFFFFFFFF
        while self.state == "open":
            room = self.guest_window - flight
            unsent = len(self.outbound) - flight
            if room <= 0 or unsent <= 0:
                break
            size = min(self.mss, room, unsent)
            self.send(ACK | PSH, bytes(self.outbound[flight : flight + size]))
            self.snd_nxt = (self.snd_nxt + size) & 0xFFFFFFFF
            flight += size
        done = self.remote_eof and flight == len(self.outbound)
        if done and not self.fin_sent and self.state == "open":
            self.send(FIN | ACK)
            self.snd_nxt = (self.snd_nxt + 1) & 0xFFFFFFFF
            self.fin_sent = True

    def resend(self) -> None:
        """Nothing acknowledged for a while: send the oldest unacknowledged bytes again."""
        flight = (self.snd_nxt - self.snd_una) & 0xFFFFFFFF
        data = min(flight, len(self.outbound))
        if data:
            self.send(ACK | PSH, bytes(self.outbound[: min(self.mss, data)]), seq=self.snd_una)
        elif self.fin_sent and flight:
            self.send(FIN | ACK, seq=(self.snd_nxt - 1) & 0xFFFFFFFF)
        self.progress = time.monotonic()

    # -- from the guest
    def segment(self, flags: int, seq: int, ack: int, window: int, payload: bytes) -> None:
        if flags & RST:
            self.close()
            return
        if flags & SYN:
            if self.state == "syn" and self.proxy.answered(self):
                self.syn_ack()  # the guest resent its SYN
            return
        if not flags & ACK:
            return
        if self.state == "syn":
            if ack != self.snd_nxt or not self.proxy.answered(self):
                self.send(RST, seq=ack)
                self.close()
                return
            self.state = "open"
            self.proxy.opened(self)
        acked = (ack - self.snd_una) & 0xFFFFFFFF
        flight = (self.snd_nxt - self.snd_una) & 0xFFFFFFFF
        if 0 < acked <= flight:
            self.snd_una = ack
            del self.outbound[: min(acked, len(self.outbound))]
            self.progress = time.monotonic()
            self.space.set()
        self.guest_window = window << (self.wscale or 0)
        if payload or flags & FIN:
            self._take(seq, payload, bool(flags & FIN))
        self.push()

    def _take(self, seq: int, payload: bytes, fin: bool) -> None:
        behind = (self.rcv_nxt - seq) & 0xFFFFFFFF
        if behind >= 1 << 31 or behind > len(payload):
            self.send(ACK)  # ahead of us (cannot be on this link), or all old: say where
            return
        new = payload[behind:][: self.window()]
        self.rcv_nxt = (self.rcv_nxt + len(new)) & 0xFFFFFFFF
        self.inbound += new
        if fin and len(new) == len(payload) - behind and not self.guest_fin:
            self.guest_fin = True
            self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF
        self.send(ACK)
        self.proxy.forward(self)


# ------------------------------------------------------------------ the endpoint
class EgressProxy:
    def __init__(
        self, rules: AllowList, resolver: Resolver, log: EgressLog, names: Names,
        private: list[ipaddress.IPv4Network], checks: Policy | None = None,
        connect=asyncio.open_connection,
    ) -> None:  # fmt: skip
        self.rules, self.resolver, self.log, self.names = rules, resolver, log, names
        self.private = private
        self.checks = checks or Policy()
        self.connect_to = connect  # (tests reach their servers through it)
        self.conns: dict[tuple, Conn] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.background: set[asyncio.Task] = set()

    def start(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- frames
    def to_guest(self, frame: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(struct.pack("!I", len(frame)) + frame)

    def frame(self, frame: bytes) -> None:
        if len(frame) < 14 or len(frame) > MAX_GUEST_FRAME:
            return
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == ETH_ARP:
            if (reply := arp_reply(frame)) is not None:
                self.to_guest(reply)
            return
        if ethertype != ETH_IPV4 or len(frame) < 34 or frame[14] >> 4 != 4:
            return
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        if ihl < 20 or total < ihl or 14 + total > len(frame) or frame[26:30] != _GUEST:
            return
        if struct.unpack_from("!H", frame, 20)[0] & 0x3FFF:
            return  # a fragment: nothing of ours makes them
        proto, dst = frame[23], bytes(frame[30:34])
        body = bytes(frame[14 + ihl : 14 + total])
        if proto == socket.IPPROTO_TCP and len(body) >= 20:
            self.tcp(dst, body)
        elif proto == socket.IPPROTO_UDP and len(body) >= 8:
            sport, dport = struct.unpack_from("!HH", body)
            if dst == _DNS and dport == dns.DNS_PORT:
                self.start(self.dns(sport, body[8:]))
            else:
                self.refuse(frame, dst, dport, "udp")  # QUIC and the rest: TCP instead
        elif proto == socket.IPPROTO_ICMP:
            self.refuse(frame, dst, None, "icmp")

    def refuse(self, frame: bytes, dst: bytes, port: int | None, proto: str) -> None:
        self.log.record(self.names.name(dst), dst, port, proto, False)
        self.to_guest(ipv4_frame(dst, _GUEST, socket.IPPROTO_ICMP, icmp_prohibited(frame)))

    # -- DNS
    async def dns(self, sport: int, query: bytes) -> None:
        parsed = dns.parse_query(query)
        if parsed is None or parsed.opcode != 0:
            return
        name = normalize_name(parsed.name)
        if valid_name(name) and self.rules.name_allowed(name):
            if parsed.qtype != dns.TYPE_A:
                reply = dns.empty(query, parsed)  # IPv4 only: no AAAA, say "none"
            elif await self.connectable(name) and (addr := self.names.address(name)):
                reply = dns.a_answer(query, parsed, addr, DNS_TTL)
            else:
                reply = dns.nxdomain(query, parsed)
        else:
            self.log.record(safe_name(name), _DNS, dns.DNS_PORT, "dns", False)
            reply = dns.nxdomain(query, parsed)
        self.to_guest(udp_frame(_DNS, dns.DNS_PORT, sport, reply))

    async def connectable(self, name: str) -> list[bytes]:
        """The addresses of ``name`` the host would connect to."""
        return [a for a in await self.resolver.resolve(name) if self.address_ok(a, answer=True)]

    def address_ok(self, addr: bytes, answer: bool) -> bool:
        """May the host connect to ``addr``? Never the host, loopback, link-local, metadata or
        multicast; an address a name resolved to must be global, or in a range the admin
        listed (``private_answer_ranges``)."""
        if not self.checks.destination_ok(addr):
            return False
        ip = ipaddress.IPv4Address(addr)
        return not answer or ip.is_global or any(ip in net for net in self.private)

    # -- TCP
    def tcp(self, dst: bytes, body: bytes) -> None:
        sport, dport, seq, ack, off, flags, window = struct.unpack_from("!HHIIBBH", body)
        hl = (off >> 4) * 4
        if hl < 20 or hl > len(body):
            return
        key = (sport, dst, dport)
        payload = body[hl:]
        if (conn := self.conns.get(key)) is not None:
            conn.segment(flags, seq, ack, window, payload)
            return
        if flags & RST:
            return
        if not flags & SYN or flags & ACK:  # not a connection we know: reset it
            self.to_guest(tcp_frame(dst, dport, sport, ack, (seq + len(payload)) & 0xFFFFFFFF,
                                    RST | ACK, 0))  # fmt: skip
            return
        how = self.judge_syn(dst, dport)
        if how is None or len(self.conns) >= MAX_CONNECTIONS:
            self.log.record(self.names.name(dst), dst, dport, "tcp", False)
            self.to_guest(tcp_frame(dst, dport, sport, 0, (seq + 1) & 0xFFFFFFFF, RST | ACK, 0))
            return
        mss, wscale = tcp_options(body[20:hl])
        conn = Conn(self, key, dst, dport, sport, seq, mss, wscale)
        self.conns[key] = conn
        if how == "connect":  # the host connects first, then answers the SYN
            conn.start(self.connect(conn, answer_syn=True))
        else:
            conn.syn_ack()

    def judge_syn(self, dst: bytes, port: int) -> str | None:
        """ "connect" (at once), "inspect" (read the first bytes), or None (refuse)."""
        name = self.names.name(dst)
        if name is not None:
            ranges = self.rules.name_ports(name)
            if not ports_ok(ranges, port):
                return None
            listed = any(r is not None and r[0] <= port <= r[1] for r in ranges)
            return "connect" if listed else "inspect"
        if ipaddress.IPv4Address(dst) in SYNTH_NET:
            return None  # a synthetic address this kernel was never given
        allowed = self.rules.address_allowed(ipaddress.IPv4Address(dst), port)
        return "connect" if allowed and self.address_ok(dst, answer=False) else None

    def answered(self, conn: Conn) -> bool:
        """Has the guest's SYN been answered (not still waiting for the host's connect)?"""
        return conn.remote is not None or self.judge_syn(conn.dst, conn.dport) == "inspect"

    def opened(self, conn: Conn) -> None:
        if conn.remote is None:  # (one connected first may wait for its server to speak)
            conn.start(self.verdict_timer(conn))

    async def verdict_timer(self, conn: Conn) -> None:
        await asyncio.sleep(VERDICT_SECONDS)
        if not conn.judged and conn.state != "closed":
            self.block(conn)

    def block(self, conn: Conn) -> None:
        self.log.record(conn.name, conn.dst, conn.dport, conn.protocol, False)
        conn.reset()

    def forward(self, conn: Conn) -> None:
        """Judge what the guest sent (once), then hand judged bytes to the remote."""
        if conn.state == "closed":
            return
        if not conn.judged:
            data = bytes(conn.inbound)
            protocol = protocol_of(data)
            if protocol == "more":
                if len(data) >= MAX_INSPECT:
                    self.block(conn)
                return
            conn.protocol = protocol
            listed = self.judge_syn(conn.dst, conn.dport) == "connect"
            if protocol == "tcp":
                if not listed:  # another protocol only on a port listed for the name
                    self.block(conn)
                    return
            else:
                state, _, named = classify(data)
                if state == "more" and len(data) < MAX_INSPECT:
                    return
                if state != "done" or not self.names_ok(conn, named):
                    self.block(conn)
                    return
            conn.judged = True
            if protocol == "http":
                conn.http = HttpRequests()
            if conn.remote is not None:
                self.log.record(conn.name, conn.dst, conn.dport, conn.protocol, True)
            if conn.remote is None:
                conn.start(self.connect(conn, answer_syn=False))
                return
        self.flush_inbound(conn)

    def names_ok(self, conn: Conn, named) -> bool:
        """Every host the client named is this connection's name (and a port it named, one
        the name's entries allow)."""
        ranges = self.rules.name_ports(conn.name or "")
        return bool(named) and all(
            normalize_name(host) == conn.name and (port is None or ports_ok(ranges, port))
            for host, port in named
        )

    def flush_inbound(self, conn: Conn) -> None:
        if conn.remote is None or conn.state == "closed":
            return
        data = bytes(conn.inbound)
        conn.inbound.clear()
        if conn.http is not None and data:
            fed = conn.http.feed(data)
            if fed is None:
                self.block(conn)  # framing the host cannot follow
                return
            data, heads = fed
            for head in heads:
                state, _, named = classify(head)
                if state != "done" or not self.names_ok(conn, named):
                    self.block(conn)  # a later request names another host
                    return
        if data:
            conn.remote[1].write(data)
            conn.start(self.drained(conn))
        if conn.guest_fin and not conn.remote_shut and not (conn.http and conn.http.pending):
            conn.remote_shut = True
            with contextlib.suppress(OSError):
                conn.remote[1].write_eof()

    async def drained(self, conn: Conn) -> None:
        assert conn.remote is not None
        with contextlib.suppress(OSError, ConnectionError):
            await conn.remote[1].drain()
        if conn.state == "open":
            conn.send(ACK)  # our window opened again

    async def connect(self, conn: Conn, answer_syn: bool) -> None:
        """Connect on the host: to an address of the connection's name, or to its address."""
        addrs = await self.connectable(conn.name) if conn.name is not None else [conn.dst]
        for addr in addrs:
            try:
                conn.remote = await asyncio.wait_for(
                    self.connect_to(socket.inet_ntoa(addr), conn.dport, limit=WINDOW),
                    CONNECT_SECONDS,
                )  # fmt: skip
                break
            except (OSError, TimeoutError, asyncio.TimeoutError):
                continue
        if conn.remote is None:
            self.block(conn)
            return
        if conn.judged:  # (a connection judged later is logged then, with its protocol)
            self.log.record(conn.name, conn.dst, conn.dport, conn.protocol, True)
        sock = conn.remote[1].get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if answer_syn:
            conn.syn_ack()
        conn.start(self.from_remote(conn))
        if conn.judged:
            self.flush_inbound(conn)
        else:
            self.forward(conn)

    async def from_remote(self, conn: Conn) -> None:
        assert conn.remote is not None
        reader = conn.remote[0]
        try:
            while conn.state != "closed":
                while len(conn.outbound) >= WINDOW:
                    conn.space.clear()
                    await conn.space.wait()
                    if conn.state == "closed":
                        return
                data = await reader.read(WINDOW - len(conn.outbound))
                if not data:
                    break
                conn.outbound += data
                conn.push()
        except (OSError, ConnectionError):
            conn.reset()
            return
        conn.remote_eof = True
        conn.push()

    async def ticks(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for conn in list(self.conns.values()):
                flight = (conn.snd_nxt - conn.snd_una) & 0xFFFFFFFF
                if conn.state == "syn" and now - conn.born > HANDSHAKE_SECONDS + CONNECT_SECONDS:
                    conn.close()
                elif conn.state != "open":
                    continue
                elif flight and now - conn.progress > RESEND_SECONDS:
                    conn.resend()
                elif not flight and conn.fin_sent and conn.guest_fin:
                    conn.close()  # both sides done, all acknowledged
                elif now - conn.progress > IDLE_SECONDS:
                    conn.reset()
            self.log.flush()


# ------------------------------------------------------------------ the process
async def serve(sock: socket.socket, proxy: EgressProxy, pacer: Pacer | None = None) -> None:
    pacer = pacer or Pacer()
    reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_FRAME * 2)
    proxy.writer = writer
    ticks = asyncio.ensure_future(proxy.ticks())
    try:
        while True:
            head = await reader.readexactly(4)
            (length,) = struct.unpack("!I", head)
            if length > MAX_FRAME:
                return
            frame = await reader.readexactly(length)
            tokens_wait = pacer_delay(pacer)
            if tokens_wait:
                await asyncio.sleep(tokens_wait)
            proxy.frame(frame)
            if writer.transport.get_write_buffer_size() > (8 << 20):
                await writer.drain()  # the guest is slow: stop reading it meanwhile
    except (asyncio.IncompleteReadError, OSError, ConnectionError):
        pass
    finally:
        ticks.cancel()
        for conn in list(proxy.conns.values()):
            conn.close()
        proxy.log.flush(force=True)
        writer.close()


def pacer_delay(pacer: Pacer) -> float:
    """The token bucket's wait before the next frame (0: none), without sleeping here."""
    now = time.monotonic()
    pacer.tokens = min(pacer.burst, pacer.tokens + (now - pacer.last) * pacer.rate)
    pacer.last = now
    if pacer.tokens < 1:
        wait = (1 - pacer.tokens) / pacer.rate
        pacer.tokens = 0
        return wait
    pacer.tokens -= 1
    return 0.0


def load(state: Path) -> EgressProxy:
    """The proxy ``network.start_network`` configured in the kernel's folder ``state``."""
    config = json.loads((state / POLICY_FILE).read_text())
    rules = AllowList.parse(config["allow_hosts"])
    servers = list(config.get("resolvers") or []) or host_resolvers()
    private = [check_cidr(c) for c in config.get("private_answers", [])]
    log = EgressLog(state / LOG_FILE, list(config["allow_hosts"]))
    log.load()
    return EgressProxy(rules, Resolver(servers), log, Names(state / NAMES_FILE), private)


def main(argv: list[str] | None = None) -> int:
    """``VM_FD READY_FD STATE_DIR``: says ``ok`` on READY_FD once the policy is loaded."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: egress_proxy VM_FD READY_FD STATE_DIR", file=sys.stderr)
        return 2
    vm = socket.socket(fileno=int(argv[0]))
    try:
        proxy = load(Path(argv[2]))
    except (OSError, ValueError, KeyError) as e:
        print(f"smol-kernel egress proxy: {e}; refusing to start the network", file=sys.stderr)
        return 1
    os.write(int(argv[1]), b"ok")
    os.close(int(argv[1]))
    asyncio.run(serve(vm, proxy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
