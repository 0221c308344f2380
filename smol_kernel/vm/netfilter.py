"""The guard between a VM's network device and its passt: drops frames aimed at the host.

passt makes ordinary host sockets for whatever the guest's frames ask for. A guest with a
raw socket can ask for anything -- measured with bookworm's passt 2023.03: an Ethernet frame
sent to 127.0.0.1 reached a UDP server on the host's loopback. So every guest -> passt frame
goes through ``allow_frame`` first. It passes ARP, and IPv4 unless the destination is:

* loopback (127/8), "this network" (0/8), link-local (169.254/16 -- cloud metadata services
  live there), multicast and reserved (224/3, broadcast included);
* any address of the host itself (read when the guard starts): a service the host binds on
  all interfaces must not be reachable either;
* the guest's own virtual subnet (10.0.2.0/24) -- except DNS (UDP or TCP port 53) to the DNS
  address that passt forwards to the host's resolver.

Everything else (IPv6 included: passt runs IPv4-only) is dropped. Frames passt sends to the
guest pass unchanged. Wire format on both sides: QEMU's ``-netdev stream`` framing, a 4-byte
big-endian length before each Ethernet frame (libkrun's unixstream uses the same).

Runs as its own helper process per VM (``python -m smol_kernel.vm.netfilter VMFD PASSTFD``),
so the Jupyter server's process never parses guest traffic; it exits when either side
closes.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import struct
import sys
import threading

from .network import DNS, GUEST_ADDR, PREFIX

ETH_ARP = 0x0806
ETH_IPV4 = 0x0800
DNS_PORT = 53
ALWAYS_BLOCKED = tuple(
    ipaddress.ip_network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3")
)
MAX_FRAME = 65535 + 64


def host_addresses() -> set[ipaddress.IPv4Address]:
    """The host's own IPv4 addresses (its LOCAL routes)."""
    out = set()
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for prev, line in itertools.pairwise(lines):
        if "host LOCAL" in line and "|--" in prev:
            out.add(ipaddress.IPv4Address(prev.split("|--")[1].strip()))
    return out


class Policy:
    """Which guest frames may reach passt."""

    def __init__(self, host_addrs: set[ipaddress.IPv4Address] | None = None) -> None:
        self.host_addrs = host_addresses() if host_addrs is None else set(host_addrs)
        self.guest_net = ipaddress.ip_network(f"{GUEST_ADDR}/{PREFIX}", strict=False)
        self.dns = ipaddress.IPv4Address(DNS)

    def allow_frame(self, frame: bytes | memoryview) -> bool:
        if len(frame) < 14:
            return False
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == ETH_ARP:
            return True
        if ethertype != ETH_IPV4 or len(frame) < 14 + 20:
            return False
        ihl = (frame[14] & 0x0F) * 4
        if frame[14] >> 4 != 4 or ihl < 20:
            return False
        dst = ipaddress.IPv4Address(bytes(frame[30:34]))
        if any(dst in net for net in ALWAYS_BLOCKED) or dst in self.host_addrs:
            return False
        if dst in self.guest_net:
            return dst == self.dns and self._is_dns(frame, ihl)
        return True

    @staticmethod
    def _is_dns(frame: bytes | memoryview, ihl: int) -> bool:
        proto = frame[14 + 9]
        frag = struct.unpack_from("!H", frame, 14 + 6)[0] & 0x1FFF
        l4 = 14 + ihl
        if proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) or frag or len(frame) < l4 + 4:
            return False
        return struct.unpack_from("!H", frame, l4 + 2)[0] == DNS_PORT


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def guard(vm: socket.socket, passt: socket.socket, policy: Policy) -> None:
    """Forward until either side closes: filtered guest -> passt, raw passt -> guest."""
    done = threading.Event()

    def to_guest() -> None:
        try:
            while chunk := passt.recv(1 << 16):
                vm.sendall(chunk)
        except OSError:
            pass
        done.set()

    threading.Thread(target=to_guest, daemon=True).start()
    try:
        while not done.is_set():
            head = _recv_exact(vm, 4)
            if head is None:
                break
            (length,) = struct.unpack("!I", head)
            if length > MAX_FRAME:
                break  # not the stream framing; stop rather than guess
            frame = _recv_exact(vm, length)
            if frame is None:
                break
            if policy.allow_frame(frame):
                passt.sendall(head + frame)
    except OSError:
        pass
    for s in (vm, passt):
        try:  # shutdown, not just close: it wakes the other thread's recv, and the peer
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m smol_kernel.vm.netfilter VM_FD PASST_FD", file=sys.stderr)
        return 2
    vm = socket.socket(fileno=int(argv[0]))
    passt = socket.socket(fileno=int(argv[1]))
    guard(vm, passt, Policy())
    return 0


if __name__ == "__main__":
    sys.exit(main())
