"""The guard between a VM's network device and its passt: keeps the guest off the host.

passt makes ordinary host sockets for whatever the guest's frames ask for. A guest with a
raw socket can ask for anything -- measured with bookworm's passt 2023.03: an Ethernet frame
sent to 127.0.0.1 reached a UDP server on the host's loopback. So every frame passes this
guard, one helper process per VM, and the Jupyter server's process never parses guest
traffic. What it guarantees:

Guest -> passt (``Policy.allow_frame``): ARP passes; IPv4 passes unless

* the destination is loopback (127/8), "this network" (0/8), link-local (169.254/16, cloud
  metadata), multicast or reserved (224/3, broadcast included), or a known host-local or
  cloud endpoint (``KNOWN_ENDPOINTS``: Alibaba Cloud metadata, Azure's host agent,
  tailscale's resolver);
* the destination is the host itself: inside a ``host LOCAL`` route of the routing table
  (read when the guard starts -- it refuses to start if it cannot read it -- and again
  for new destinations) or an address the host can bind to (a probe per new destination,
  cached for ``HOST_CACHE_SECONDS``), so addresses the host gains later count too;
* the destination is the guest's own virtual subnet, except UDP port 53 to the DNS address
  passt forwards to the host's resolver;
* it is a fragment (no port to check), or would open a UDP flow (guest source port), a TCP
  connection (a SYN) or an ICMP echo id past ``MAX_UDP_FLOWS`` / ``MAX_TCP_FLOWS`` /
  ``MAX_ICMP_IDS`` live ones: passt makes one host socket per flow, so without a cap a
  guest could use up the host's ports and passt's descriptors;
* it is larger than the guest's MTU allows (``MAX_GUEST_FRAME``): the devices offer no
  segmentation offload, so such a frame is hand-made, and passt 2023.03 mis-parses a
  stream where one frame spans two of its reads.

Everything else (IPv6 included: passt runs IPv4-only) is dropped, and guest frames are
paced to ``FRAME_RATE`` per second so a flooding guest cannot hold a host core. A second
SYN, or a RST, of a TCP connection passt has not answered yet is held back
(``log.OpenNetwork``): passt 2023.03 spins on one when it shares a read with the SYN.
Every destination tried goes to the egress log. (A kernel with ``allow_hosts`` has no
passt and no guard: ``proxy.py``.)

passt -> guest (``Policy.allow_inbound``): UDP reaches the guest only from an address and
port the guest sent to from that port (passt's UDP sockets are bound to 0.0.0.0, so
anyone could otherwise send in); other frames pass unchanged.

Wire format on both sides: QEMU's ``-netdev stream`` framing, a 4-byte big-endian length
before each Ethernet frame (libkrun's unixstream uses the same). Imports only the standard
library: it runs as ``python -I`` (see ``trusted.py``) with the two sockets and a ready pipe
as inherited descriptors, and exits when either side closes.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import queue
import re
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

from ..error_root import SmolKernelError
from . import log as egress_policy
from .dns import DNS_PORT

# The guest's fixed addressing (slirp's), shared with vm/network.py.
GUEST_ADDR = "10.0.2.15"
PREFIX = 24
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
GUEST_MAC = "52:54:00:12:34:56"  # the VM NIC's (QEMU and libkrun are given it)
GUEST_MAC_BYTES = bytes.fromhex(GUEST_MAC.replace(":", ""))


def guest_net_config(dns: tuple[str, ...] = ()) -> str:
    """What the guest's /init reads from ``SMOL_NET``: ``ADDR/PREFIX,GATEWAY,DNS[,DNS...]``.
    Without ``dns`` the guest asks passt's DNS address, forwarded to the host's resolver;
    given servers are asked directly (like any other outside address, so never the host)."""
    return ",".join((f"{GUEST_ADDR}/{PREFIX}", GATEWAY, *(dns or (DNS,))))


ETH_ARP = 0x0806
ETH_IPV4 = 0x0800
ALWAYS_BLOCKED = tuple(
    ipaddress.ip_network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3")
)
KNOWN_ENDPOINTS = frozenset(
    ipaddress.IPv4Address(a)
    for a in (
        "100.100.100.200",  # Alibaba Cloud instance metadata (hands out credentials)
        "168.63.129.16",  # Azure host agent / wireserver
        "100.100.100.100",  # tailscale's resolver on the host
    )
)
MAX_FRAME = 65535 + 64  # what either side's stream framing may carry at all
MAX_GUEST_FRAME = 1500 + 14 + 4  # the guest's MTU, its Ethernet header and a VLAN tag
MAX_UDP_FLOWS = 512
MAX_TCP_FLOWS = 256
MAX_ICMP_IDS = 32
FLOW_IDLE_SECONDS = 200.0  # passt forgets a UDP flow after 180 s without traffic
HOST_CACHE_SECONDS = 5.0
FRAME_RATE = 10_000  # frames per second, guest -> passt
FRAME_BURST = 2_000
TO_GUEST_QUEUE = 4096  # frames from passt waiting for a slow guest (about 6 MiB at most)
# A fixed send buffer toward passt (not the host default): passt 2023.03 mis-parses a frame
# stream split at some boundaries, and every frame is written whole with one sendall.
PASST_SNDBUF = 1 << 20
FIB_TRIE = "/proc/net/fib_trie"
_NONLOCAL_PROBE = "198.51.100.1"  # TEST-NET-2: never a real host address


def never_reached(dst: ipaddress.IPv4Address) -> bool:
    """Loopback, "this network", link-local, multicast and reserved, known endpoints."""
    return any(dst in net for net in ALWAYS_BLOCKED) or dst in KNOWN_ENDPOINTS


class HostAddressesUnknown(SmolKernelError, RuntimeError):
    """The host's own addresses cannot be read; the guard refuses to run (fail closed)."""


def local_networks(path: str | None = None) -> set[ipaddress.IPv4Network]:
    """Every ``host LOCAL`` route of the routing table: the host's addresses, and whole
    prefixes for ``local`` routes such as 127.0.0.0/8."""
    path = path or FIB_TRIE
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise HostAddressesUnknown(f"cannot read the host's addresses from {path}: {e}") from e
    out, leaf = set(), None
    for line in lines:
        if "|--" in line:
            leaf = line.split("|--", 1)[1].strip()
        elif leaf and (m := re.search(r"/(\d+) host LOCAL", line)):
            out.add(ipaddress.IPv4Network(f"{leaf}/{m.group(1)}", strict=False))
    if not out:
        raise HostAddressesUnknown(f"no local routes in {path}: cannot tell the host apart")
    return out


def host_addresses() -> set[ipaddress.IPv4Address]:
    """The host's own single IPv4 addresses (its /32 LOCAL routes)."""
    return {n.network_address for n in local_networks() if n.prefixlen == 32}


def _can_bind(addr: str) -> bool:
    """Whether this host can bind ``addr``: true exactly for its own addresses."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((addr, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


class Policy:
    """Which frames may pass, with the per-VM flow state that takes."""

    def __init__(
        self,
        host_nets: set[ipaddress.IPv4Network] | None = None,
        probe: bool = True,
        clock=time.monotonic,
        egress: egress_policy.OpenNetwork | None = None,
    ) -> None:
        self.egress = egress
        self._read_nets = host_nets is None
        self.host_nets = local_networks() if host_nets is None else set(host_nets)
        self._nets_read = clock()
        # With net.ipv4.ip_nonlocal_bind on, every bind succeeds: the probe says nothing.
        self.probe = probe and not _can_bind(_NONLOCAL_PROBE)
        self.clock = clock
        self.guest_net = ipaddress.ip_network(f"{GUEST_ADDR}/{PREFIX}", strict=False)
        self.dns = ipaddress.IPv4Address(DNS)
        self._host_cache: dict[ipaddress.IPv4Address, tuple[bool, float]] = {}
        self.udp_flows: dict[int, float] = {}  # guest source port -> last use
        self.udp_peers: dict[tuple[int, bytes, int], float] = {}  # (sport, dst, dport)
        self.icmp_ids: dict[int, float] = {}
        self.tcp_flows: dict[tuple[int, bytes, int], float] = {}  # (sport, dst, dport)
        self.dropped = 0

    # ---------------------------------------------------------------- guest -> passt
    def allow_frame(self, frame: bytes | memoryview) -> bool:
        """Whether ``frame`` may go to passt."""
        ok = self._allow(frame)
        self.dropped += not ok
        return ok

    def _allow(self, frame: bytes | memoryview) -> bool:
        if len(frame) < 14 or len(frame) > MAX_GUEST_FRAME:
            return False
        if bytes(frame[6:12]) != GUEST_MAC_BYTES:
            return False  # the NIC's address only: passt learns where to send from it
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == ETH_ARP:
            return len(frame) >= 42 and bytes(frame[22:28]) == GUEST_MAC_BYTES
        if ethertype != ETH_IPV4 or len(frame) < 14 + 20:
            return False
        ihl = (frame[14] & 0x0F) * 4
        if frame[14] >> 4 != 4 or ihl < 20 or len(frame) < 14 + ihl:
            return False
        if struct.unpack_from("!H", frame, 16)[0] != len(frame) - 14:
            return False  # passt drops it too: the guard must read what passt reads
        if struct.unpack_from("!H", frame, 14 + 6)[0] & 0x3FFF:  # MF or an offset
            return False
        dst = ipaddress.IPv4Address(bytes(frame[30:34]))
        proto, l4 = frame[14 + 9], 14 + ihl
        if never_reached(dst):
            return self._host_refused(frame, proto, l4)
        if dst in self.guest_net:
            if not (dst == self.dns and proto == socket.IPPROTO_UDP and len(frame) >= l4 + 8):
                return self._host_refused(frame, proto, l4)
            if struct.unpack_from("!H", frame, l4 + 2)[0] != DNS_PORT:
                return self._host_refused(frame, proto, l4)
        elif self.is_host(dst):
            return self._host_refused(frame, proto, l4)
        if self.egress is not None and not self._egress_allows(frame, proto, l4):
            return False
        if proto == socket.IPPROTO_UDP:
            return self._udp_flow(frame, l4)
        if proto == socket.IPPROTO_TCP:
            return self._tcp_flow(frame, l4)
        if proto == socket.IPPROTO_ICMP:
            return self._icmp_echo(frame, l4)
        return True

    def destination_ok(self, addr: bytes) -> bool:
        """May anything of the guest's reach ``addr``? Not loopback, link-local, metadata,
        multicast, the guest's own subnet or the host (``proxy`` connects only
        where this says yes)."""
        dst = ipaddress.IPv4Address(addr)
        return not (never_reached(dst) or dst in self.guest_net or self.is_host(dst))

    def _attempt(
        self, frame: bytes | memoryview, proto: int, l4: int
    ) -> tuple[str, int | None] | None:
        """(protocol, port) if the frame opens something: a TCP SYN, a UDP datagram to a
        peer the guest has not sent to, an echo request with a new id; else None."""
        if proto == socket.IPPROTO_TCP and len(frame) >= l4 + 14:
            syn = frame[l4 + 13] & 0x12 == 0x02
            return ("tcp", struct.unpack_from("!H", frame, l4 + 2)[0]) if syn else None
        if proto == socket.IPPROTO_UDP and len(frame) >= l4 + 8:
            sport, dport = struct.unpack_from("!HH", frame, l4)
            new = (sport, bytes(frame[30:34]), dport) not in self.udp_peers
            return ("udp", dport) if new else None
        if proto == socket.IPPROTO_ICMP and len(frame) >= l4 + 8 and frame[l4] == 8:
            new = struct.unpack_from("!H", frame, l4 + 4)[0] not in self.icmp_ids
            return ("icmp", None) if new else None
        return None

    def _host_refused(self, frame: bytes | memoryview, proto: int, l4: int) -> bool:
        """Dropped by the host checks: logged as a blocked attempt when it is one."""
        if self.egress is not None and (attempt := self._attempt(frame, proto, l4)):
            dst = bytes(frame[30:34])
            self.egress.log.record(self.egress.name_of(dst), dst, attempt[1], attempt[0], False)
        return False

    def _egress_allows(self, frame: bytes | memoryview, proto: int, l4: int) -> bool:
        assert self.egress is not None
        if proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            if len(frame) < l4 + (14 if proto == socket.IPPROTO_TCP else 8):
                return False
        elif proto == socket.IPPROTO_ICMP and len(frame) < l4 + 8:
            return False
        new = self._attempt(frame, proto, l4) is not None
        return self.egress.outbound(bytes(frame), proto, l4, new)

    def _tcp_flow(self, frame: bytes | memoryview, l4: int) -> bool:
        """A SYN opens a flow (passt connects a host socket for it); FIN or RST from the
        guest ends it; other segments refresh the flow they belong to."""
        if len(frame) < l4 + 14:
            return False
        sport, dport = struct.unpack_from("!HH", frame, l4)
        flags = frame[l4 + 13]
        key = (sport, bytes(frame[30:34]), dport)
        now = self.clock()
        if flags & 0x02 and not flags & 0x10:  # SYN without ACK: a new connection
            if key not in self.tcp_flows and not _room(self.tcp_flows, MAX_TCP_FLOWS, now):
                return False
            self.tcp_flows[key] = now
        elif flags & 0x05:  # FIN or RST
            self.tcp_flows.pop(key, None)
        elif key in self.tcp_flows:
            self.tcp_flows[key] = now
        return True

    def _udp_flow(self, frame: bytes | memoryview, l4: int) -> bool:
        if len(frame) < l4 + 8:
            return False
        sport, dport = struct.unpack_from("!HH", frame, l4)
        now = self.clock()
        if sport not in self.udp_flows and not _room(self.udp_flows, MAX_UDP_FLOWS, now):
            return False
        self.udp_flows[sport] = now
        peers = self.udp_peers
        if len(peers) >= 8 * MAX_UDP_FLOWS:
            _expire(peers, now)
        if len(peers) < 8 * MAX_UDP_FLOWS:
            peers[(sport, bytes(frame[30:34]), dport)] = now
        return True

    def _icmp_echo(self, frame: bytes | memoryview, l4: int) -> bool:
        if len(frame) < l4 + 8 or frame[l4] != 8:  # only echo requests go out
            return False
        ident = struct.unpack_from("!H", frame, l4 + 4)[0]
        now = self.clock()
        if ident not in self.icmp_ids and not _room(self.icmp_ids, MAX_ICMP_IDS, now):
            return False
        self.icmp_ids[ident] = now
        return True

    def is_host(self, dst: ipaddress.IPv4Address) -> bool:
        now = self.clock()
        cached = self._host_cache.get(dst)
        if cached and now - cached[1] < HOST_CACHE_SECONDS:
            return cached[0]
        try:
            if self._read_nets and now - self._nets_read >= HOST_CACHE_SECONDS:
                self.host_nets, self._nets_read = local_networks(), now
            host = any(dst in net for net in self.host_nets)
            host = host or (self.probe and _can_bind(str(dst)))
        except (HostAddressesUnknown, OSError):
            host = True  # cannot tell: treat it as the host
        if len(self._host_cache) >= 4096:
            self._host_cache.clear()
        self._host_cache[dst] = (host, now)
        return host

    # ---------------------------------------------------------------- passt -> guest
    def allow_inbound(self, frame: bytes | memoryview) -> bool:
        """UDP only from where the guest sent to, and refreshes that flow."""
        if (why := _not_a_passt_frame(frame)) is not None:
            # passt writes a frame's length and body in two sends, so a guest that stops
            # reading can make the stream lose its framing; read on and the next "frame"
            # could be bytes a remote sent. Fail closed: the network ends here.
            raise FramingLost(why)
        if struct.unpack_from("!H", frame, 12)[0] != ETH_IPV4:
            return True
        l4 = 14 + (frame[14] & 0x0F) * 4
        if frame[14 + 9] == socket.IPPROTO_TCP and len(frame) >= l4 + 20:
            if frame[l4 + 13] & 0x04:  # passt reset it: the flow is over
                sport, dport = struct.unpack_from("!HH", frame, l4)
                self.tcp_flows.pop((dport, bytes(frame[26:30]), sport), None)
            if self.egress is not None:
                self.egress.inbound(bytes(frame), l4)
            return True
        if frame[14 + 9] != socket.IPPROTO_UDP:
            return True
        if len(frame) < l4 + 8 or struct.unpack_from("!H", frame, 14 + 6)[0] & 0x3FFF:
            return False
        sport, dport = struct.unpack_from("!HH", frame, l4)
        key = (dport, bytes(frame[26:30]), sport)
        if key not in self.udp_peers:
            self.dropped += 1
            return False
        now = self.clock()
        self.udp_peers[key] = self.udp_flows[dport] = now
        if self.egress is not None and sport == DNS_PORT:
            self.egress.inbound(bytes(frame), l4)  # names for the log
        return True


class FramingLost(Exception):
    """What passt sent is not a frame passt makes: the stream's framing is lost."""


def _not_a_passt_frame(frame: bytes | memoryview) -> str | None:
    """Why ``frame`` cannot be one passt wrote (ARP, or a well-formed IPv4 packet), or None."""
    if len(frame) < 14:
        return f"a {len(frame)}-byte frame"
    if bytes(frame[0:6]) not in (GUEST_MAC_BYTES, b"\xff" * 6):
        return "a frame for another address than the guest's"
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_ARP:
        return None if len(frame) >= 42 else "a short ARP frame"
    if ethertype != ETH_IPV4 or len(frame) < 34:
        return f"ethertype {ethertype:#06x}, {len(frame)} bytes"
    if frame[14] >> 4 != 4 or frame[14] & 0x0F < 5:
        return "not an IPv4 header"
    if struct.unpack_from("!H", frame, 16)[0] != len(frame) - 14:
        return "an IPv4 length that disagrees with the frame"
    return None


def _room(table: dict, limit: int, now: float) -> bool:
    if len(table) >= limit:
        _expire(table, now)
    return len(table) < limit


def _expire(table: dict, now: float) -> None:
    # list() copies in one step: the other direction's thread may add a key meanwhile.
    for key, seen in list(table.items()):
        if now - seen > FLOW_IDLE_SECONDS:
            table.pop(key, None)


class Pacer:
    """A token bucket: ``wait()`` before each frame keeps the rate at ``rate`` per second."""

    def __init__(self, rate: float = FRAME_RATE, burst: float = FRAME_BURST) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, time.monotonic()

    def wait(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            time.sleep((1 - self.tokens) / self.rate)
            self.tokens, self.last = 1, time.monotonic()
        self.tokens -= 1


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _frames(sock: socket.socket):
    """Frames of a length-prefixed stream, until it closes or breaks (each is written on
    with a length computed from what is sent: never a header read here)."""
    while (head := _recv_exact(sock, 4)) is not None:
        (length,) = struct.unpack("!I", head)
        if length > MAX_FRAME:
            return  # not the stream framing; stop rather than guess
        frame = _recv_exact(sock, length)
        if frame is None:
            return
        yield frame


def guard(
    vm: socket.socket, passt: socket.socket, policy: Policy, pacer: Pacer | None = None
) -> None:
    """Forward until either side closes: guest -> passt and passt -> guest, filtered."""
    pacer = pacer or Pacer()
    passt.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PASST_SNDBUF)
    done = threading.Event()
    egress = policy.egress

    # passt writes some frames (ARP, ICMP) as a length and a body in two non-blocking sends:
    # if the guard stopped reading while the guest is slow, a length could go out alone and
    # the stream would lose its framing. So one thread always reads passt, into a bounded
    # queue (full: the frame is dropped, as a NIC with a full ring drops), and another
    # writes the queue to the guest.
    to_vm: queue.Queue[bytes] = queue.Queue(maxsize=TO_GUEST_QUEUE)
    passt_ended = threading.Event()

    def from_passt() -> None:
        try:
            for frame in _frames(passt):
                if policy.allow_inbound(frame):
                    try:
                        to_vm.put_nowait(frame)
                    except queue.Full:
                        policy.dropped += 1
        except OSError:
            pass
        except FramingLost as e:
            print(f"smol-kernel network guard: passt's stream lost its framing ({e}); "
                  "closing the guest's network", file=sys.stderr)  # fmt: skip
        except Exception:  # a bug must end the network visibly, not leave half of it
            traceback.print_exc()
        passt_ended.set()  # to_guest delivers what is queued, then closes both sides

    def to_guest() -> None:
        try:
            while not done.is_set():
                try:
                    out = to_vm.get(timeout=0.2)
                except queue.Empty:
                    if passt_ended.is_set():
                        break
                    continue
                vm.sendall(struct.pack("!I", len(out)) + out)
        except OSError:
            pass
        done.set()
        _close(vm, passt)  # wakes the other direction's recv

    def keep_log() -> None:
        while not done.wait(egress_policy.LOG_INTERVAL):
            egress.log.flush()

    threading.Thread(target=from_passt, daemon=True).start()
    threading.Thread(target=to_guest, daemon=True).start()
    if egress is not None:
        threading.Thread(target=keep_log, daemon=True).start()
    try:
        for frame in _frames(vm):
            if done.is_set():
                break
            pacer.wait()
            if policy.allow_frame(frame):  # (its own length: never another frame's)
                passt.sendall(struct.pack("!I", len(frame)) + frame)
    except OSError:
        pass
    except Exception:
        traceback.print_exc()
    done.set()
    if egress is not None:
        egress.log.flush(force=True)
    _close(vm, passt)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:  # shutdown, not just close: it wakes the other thread's recv, and the peer
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def main(argv: list[str] | None = None) -> int:
    """``VM_FD PASST_FD READY_FD [RUNTIME_DIR]``: says ``ok`` on READY_FD once the policy is
    loaded. With RUNTIME_DIR: the egress policy is read from there and its log kept there."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (3, 4):
        print("usage: netfilter VM_FD PASST_FD READY_FD [RUNTIME_DIR]", file=sys.stderr)
        return 2
    vm = socket.socket(fileno=int(argv[0]))
    passt = socket.socket(fileno=int(argv[1]))
    try:
        egress = egress_policy.open_network(Path(argv[3])) if len(argv) == 4 else None
        policy = Policy(egress=egress)
    except (HostAddressesUnknown, OSError, ValueError, KeyError) as e:
        print(f"smol-kernel network guard: {e}; refusing to start the network", file=sys.stderr)
        return 1
    os.write(int(argv[2]), b"ok")
    os.close(int(argv[2]))
    guard(vm, passt, policy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
