"""The guest-facing half of the egress proxy: a small TCP endpoint (``Conn``) and the frames
it writes (Ethernet, IPv4, TCP and UDP, ARP answers), for a guest whose connections are
terminated on the host (``proxy.py``).

Small on purpose: the link to the VM is a socket -- no loss, no reordering, and QEMU holds
frames while the guest's ring is full -- so it sends no options but MSS and window scale,
keeps no out-of-order data, and resends only after ``RESEND_SECONDS`` without progress.
What it holds is bounded: ``MAX_INSPECT`` bytes from the guest before the connection is
judged, ``WINDOW`` bytes per direction after (the window it advertises says so, the
remote's unsent bytes counted). Standard library only.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from .netfilter import DNS, ETH_IPV4, GATEWAY, GUEST_ADDR, GUEST_MAC_BYTES

if TYPE_CHECKING:
    from .http_requests import HttpRequests

HOST_MAC = bytes.fromhex("525400123502")  # the gateway's and resolver's, to the guest
MAX_INSPECT = 16 << 10
WINDOW = 256 << 10  # bytes buffered per direction per connection
MSS = 1460
RESEND_SECONDS = 1.0
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
GUEST = socket.inet_aton(GUEST_ADDR)


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
    seg[16:18] = struct.pack("!H", l4_checksum(src, GUEST, socket.IPPROTO_TCP, bytes(seg)))
    return ipv4_frame(src, GUEST, socket.IPPROTO_TCP, bytes(seg))


def udp_frame(src: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    seg[6:8] = struct.pack("!H", l4_checksum(src, GUEST, socket.IPPROTO_UDP, bytes(seg)) or 0xFFFF)
    return ipv4_frame(src, GUEST, socket.IPPROTO_UDP, bytes(seg))


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


class Conn:
    """One TCP connection the guest opened, terminated here (see the module doc)."""

    def __init__(self, proxy: Any, key: tuple, dst: bytes, dport: int, gport: int,
                 guest_seq: int, mss: int, wscale: int | None) -> None:  # fmt: skip
        self.proxy, self.key = proxy, key
        self.dst, self.dport, self.gport = dst, dport, gport
        self.rcv_nxt = (guest_seq + 1) & 0xFFFFFFFF
        self.iss = secrets.randbits(32)  # not the guest's to predict (random's state is)
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
        self.remote_addr: bytes | None = None  # the address the host connected to
        self.remote_eof = self.guest_fin = self.fin_sent = self.remote_shut = False
        self.draining = False  # one wait for the remote's buffer to drain, not one per write
        self.scanned = 0  # how much of ``inbound`` was looked at for a head's end
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
        if self.remote is not None and self.remote[1].transport is not None:
            held += self.remote[1].transport.get_write_buffer_size()  # not sent on yet
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
        if self.guest_fin:  # nothing comes after a FIN
            self.send(ACK)
            return
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
