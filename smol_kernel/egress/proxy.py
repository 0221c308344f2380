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
  each goes to the egress log (``log.EgressLog``) with the allowed ones.
* **Never the host.** Loopback, link-local, multicast, the host's own addresses and known
  metadata endpoints are never connected to, whatever the list says (``netfilter.Policy``'s
  checks, reused); DNS answers that point there open nothing.
* **Bounded.** At most ``MAX_CONNECTIONS`` connections, ``MAX_INSPECT`` bytes held before a
  verdict, ``WINDOW`` bytes buffered per direction per connection, ``HANDSHAKE_SECONDS`` for
  the guest's handshake and ``VERDICT_SECONDS`` for its first bytes, ``CONNECT_SECONDS``
  for the host's connect; guest frames are paced (``netfilter.Pacer``).

Its rooms: the guest-facing TCP endpoint and the frames it writes (``guest_tcp.py``), the
host's resolver and the synthetic names (``names.py``), what a client's first bytes
are and its HTTP requests one by one (``http_requests.py``); this module judges and
connects. UDP other than DNS, and so QUIC, is refused: clients fall back to TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import struct
import sys
import time
from pathlib import Path

from . import dns
from .allowlist import AllowList, check_cidr, name_port_ok, normalize_name, valid_name
from .guest_tcp import (
    ACK,
    GUEST,
    MAX_INSPECT,
    RESEND_SECONDS,
    RST,
    SYN,
    WINDOW,
    Conn,
    arp_reply,
    ipv4_frame,
    tcp_frame,
    tcp_options,
    udp_frame,
)
from .http_requests import HttpRequests, protocol_of
from .log import LOG_FILE, POLICY_FILE, EgressLog, classify, icmp_prohibited, safe_name
from .names import NAMES_FILE, SYNTH_NET, Names, Resolver, host_resolvers
from .netfilter import (
    DNS,
    ETH_ARP,
    ETH_IPV4,
    MAX_FRAME,
    MAX_GUEST_FRAME,
    Pacer,
    Policy,
)

MAX_CONNECTIONS = 128
HANDSHAKE_SECONDS = 10.0
VERDICT_SECONDS = 10.0
CONNECT_SECONDS = 10.0
IDLE_SECONDS = 3600.0
DNS_TTL = 30  # what the guest is told; the host's own answers are cached for their TTL
MAX_DNS_WAITING = 256  # guest queries being answered at once; more are dropped (it asks again)
_DNS = socket.inet_aton(DNS)


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
        self.dns_waiting = 0
        self.errors = 0  # frames whose handling failed (their connection was reset)

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
        if ihl < 20 or total < ihl or 14 + total > len(frame) or frame[26:30] != GUEST:
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
                if self.dns_waiting < MAX_DNS_WAITING:
                    self.dns_waiting += 1
                    self.start(self.dns(sport, body[8:]))
            else:
                self.refuse(frame, dst, dport, "udp")  # QUIC and the rest: TCP instead
        elif proto == socket.IPPROTO_ICMP:
            self.refuse(frame, dst, None, "icmp")

    def refuse(self, frame: bytes, dst: bytes, port: int | None, proto: str) -> None:
        self.log.record(self.names.name(dst), dst, port, proto, False)
        self.to_guest(ipv4_frame(dst, GUEST, socket.IPPROTO_ICMP, icmp_prohibited(frame)))

    # -- DNS
    async def dns(self, sport: int, query: bytes) -> None:
        try:
            await self._dns(sport, query)
        finally:
            self.dns_waiting -= 1

    async def _dns(self, sport: int, query: bytes) -> None:
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
            try:
                conn.segment(flags, seq, ack, window, payload)
            except Exception as e:  # a bug of ours must cost this connection, not the network
                self.errors += 1
                if self.errors <= 10:
                    print(f"egress proxy: {type(e).__name__}: {e}; connection reset",
                          file=sys.stderr)  # fmt: skip
                conn.reset()
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
            if not name_port_ok(ranges, port):
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

    def block(self, conn: Conn, named=()) -> None:
        """Refuse ``conn`` (reset it), logged under the first host its client named, if
        any: where the guest tried to go."""
        shown = safe_name(named[0][0]) if named else conn.name
        self.log.record(shown, conn.dst, conn.dport, conn.protocol, False)
        conn.reset()

    def allowed(self, conn: Conn) -> None:
        """Logged with the address the host connected to."""
        self.log.record(conn.name, conn.remote_addr or conn.dst, conn.dport, conn.protocol, True)

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
            if protocol == "bad":
                self.block(conn)
                return
            if not _whole(protocol, data, conn):
                return  # the hello or head is not complete: judged when it is
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
                    self.block(conn, named)
                    return
            conn.judged = True
            if protocol == "http":
                conn.http = HttpRequests()
            if conn.remote is not None:
                self.allowed(conn)
            if conn.remote is None:
                conn.start(self.connect(conn, answer_syn=False))
                return
        self.flush_inbound(conn)

    def names_ok(self, conn: Conn, named) -> bool:
        """Every host the client named is this connection's name (and a port it named, one
        the name's entries allow)."""
        ranges = self.rules.name_ports(conn.name or "")
        return bool(named) and all(
            normalize_name(host) == conn.name and (port is None or name_port_ok(ranges, port))
            for host, port in named
        )

    def flush_inbound(self, conn: Conn) -> None:
        if conn.remote is None or conn.state == "closed":
            return
        if conn.remote[1].is_closing():  # the remote is gone: nothing more can go there
            conn.reset()
            return
        if conn.http is not None and conn.http.awaiting:
            return  # held (and the guest's window with it) until the server answers
        data = bytes(conn.inbound)
        conn.inbound.clear()
        if conn.http is not None and (data or conn.http.pending):
            fed = conn.http.feed(data)
            if fed is None:
                self.block(conn)  # framing the host cannot follow
                return
            data, heads = fed
            for head in heads:
                state, _, named = classify(head)
                if state != "done" or not self.names_ok(conn, named):
                    self.block(conn, named)  # a later request names another host
                    return
        if data:
            conn.remote[1].write(data)
            if not conn.draining:
                conn.draining = True
                conn.start(self.drained(conn))
        if conn.guest_fin and not conn.remote_shut and not (conn.http and conn.http.pending):
            conn.remote_shut = True
            with contextlib.suppress(OSError):
                conn.remote[1].write_eof()

    async def drained(self, conn: Conn) -> None:
        assert conn.remote is not None
        try:
            with contextlib.suppress(OSError, ConnectionError):
                await conn.remote[1].drain()
        finally:
            conn.draining = False
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
                conn.remote_addr = addr
                break
            except (OSError, TimeoutError, asyncio.TimeoutError):
                continue
        if conn.remote is None:
            self.block(conn)
            return
        if conn.judged:  # (a connection judged later is logged then, with its protocol)
            self.allowed(conn)
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
                answered = conn.http is not None and conn.http.awaiting
                conn.outbound += data
                conn.push()
                if answered and conn.http.response(data) is not None:  # type: ignore[union-attr]
                    self.flush_inbound(conn)  # what was held: passed, or judged
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


def _whole(protocol: str, data: bytes, conn: Conn) -> bool:
    """Whether a TLS record or HTTP head the guest is sending is complete (or can grow no
    more), so it is read once, not again for every segment of it."""
    if len(data) >= MAX_INSPECT:
        return True
    if protocol == "tls":
        return len(data) < 5 or len(data) >= 5 + struct.unpack_from("!H", data, 3)[0]
    if protocol == "http":
        found = b"\r\n\r\n" in data[max(0, conn.scanned - 3) :]
        conn.scanned = len(data)
        return found
    return True


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
    """The proxy ``vm.network.start_network`` configured in the kernel's folder ``state``."""
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
    # asyncio warns on every write to a lost connection: the guest must not fill our log.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
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
