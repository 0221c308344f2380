"""The network guard's policy and its forwarding, on frames built here (no VM needed; the
end-to-end attacks are in tests/security/test_network.py)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time

import pytest

from smol_kernel.egress import netfilter
from smol_kernel.egress.netfilter import (
    FLOW_IDLE_SECONDS,
    MAX_GUEST_FRAME,
    MAX_ICMP_IDS,
    MAX_TCP_FLOWS,
    MAX_UDP_FLOWS,
    HostAddressesUnknown,
    Pacer,
    Policy,
    guard,
    host_addresses,
    local_networks,
)

GUEST_MAC = bytes.fromhex("525400123456")
PASST_MAC = bytes.fromhex("02fc00000001")
HOST_ADDR = "198.51.100.7"
LOCAL_NET = "203.0.113.0/28"  # a `local` prefix route: the whole /28 is the host


def ipv4_frame(
    dst: str,
    proto: int = 6,
    dport: int = 80,
    frag: int = 0,
    ihl: int = 5,
    sport: int = 40000,
    src: str = "10.0.2.15",
    icmp_type: int = 8,
    tcp_flags: int = 0x02,  # SYN
    payload: int = 0,
) -> bytes:
    if proto == 1:
        l4 = struct.pack("!BBHHH", icmp_type, 0, 0, sport, 1) + bytes(8)
    elif proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, tcp_flags, 0, 0, 0)
    else:
        l4 = struct.pack("!HHI", sport, dport, 0) + bytes(12)
    l4 += bytes(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), 1, frag, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    ) + bytes((ihl - 5) * 4)  # fmt: skip
    return PASST_MAC + GUEST_MAC + b"\x08\x00" + ip + l4


def inbound(frame: bytes) -> bytes:
    """The same frame as passt sends it: to the guest's address."""
    return GUEST_MAC + PASST_MAC + frame[12:]


def arp_frame(sender: bytes = GUEST_MAC) -> bytes:
    """An ARP request from ``sender`` for the gateway."""
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        1,
        sender,
        socket.inet_aton("10.0.2.15"),
        bytes(6),
        socket.inet_aton("10.0.2.2"),
    )
    return PASST_MAC + sender + b"\x08\x06" + body  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def policy(clock) -> Policy:
    nets = {ipaddress.IPv4Network(f"{HOST_ADDR}/32"), ipaddress.IPv4Network(LOCAL_NET)}
    return Policy(host_nets=nets, clock=clock)


@pytest.mark.parametrize(
    "dst",
    ["127.0.0.1", "127.1.2.3", "0.0.0.0", "169.254.169.254", "224.0.0.251", "255.255.255.255",
     "10.0.2.2", "10.0.2.100", HOST_ADDR, "203.0.113.9", "100.100.100.200", "168.63.129.16",
     "100.100.100.100"],
)  # fmt: skip
def test_frames_for_the_host_and_known_endpoints_are_dropped(policy, dst):
    assert not policy.allow_frame(ipv4_frame(dst, 6))
    assert not policy.allow_frame(ipv4_frame(dst, 17))
    assert not policy.allow_frame(ipv4_frame(dst, 1))


def test_outside_addresses_pass(policy):
    for dst in ("203.0.113.80", "8.8.8.8", "10.203.0.2", "192.168.1.1", "100.100.100.201"):
        assert policy.allow_frame(ipv4_frame(dst, 6))
        assert policy.allow_frame(ipv4_frame(dst, 17))
        assert policy.allow_frame(ipv4_frame(dst, 1))


def test_only_udp_dns_reaches_the_dns_address(policy):
    assert policy.allow_frame(ipv4_frame("10.0.2.3", 17, 53))
    assert policy.allow_frame(ipv4_frame("10.0.2.3", 17, 53, ihl=6)), "IP options are fine"
    assert not policy.allow_frame(ipv4_frame("10.0.2.3", 6, 53)), "passt forwards UDP only"
    assert not policy.allow_frame(ipv4_frame("10.0.2.3", 6, 22))
    assert not policy.allow_frame(ipv4_frame("10.0.2.3", 1, 53)), "ICMP is not DNS"


def test_fragments_are_dropped(policy):
    assert not policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, frag=5)), "no L4 header"
    assert not policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, frag=0x2000)), "MF set"
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, frag=0x4000)), "DF is fine"


def test_arp_passes_and_other_protocols_do_not(policy):
    assert policy.allow_frame(arp_frame())
    other = bytes.fromhex("525400abcdef")
    assert not policy.allow_frame(arp_frame(other)), "only the NIC's own address"
    assert not policy.allow_frame(other.join([PASST_MAC, ipv4_frame("8.8.8.8")[12:]])), (
        "an IPv4 frame from another address"
    )
    ipv6 = PASST_MAC + GUEST_MAC + b"\x86\xdd" + bytes(60)
    assert not policy.allow_frame(ipv6)
    assert not policy.allow_frame(ipv4_frame("8.8.8.8")[:30]), "truncated"
    assert not policy.allow_frame(b"")
    bad_version = bytearray(ipv4_frame("8.8.8.8"))
    bad_version[14] = 0x65
    assert not policy.allow_frame(bytes(bad_version))


def test_udp_flows_are_capped_and_expire(policy, clock):
    for port in range(1024, 1024 + MAX_UDP_FLOWS):
        assert policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, sport=port))
    assert not policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, sport=60000)), "over the cap"
    assert policy.allow_frame(ipv4_frame("9.9.9.9", 17, 53, sport=1024)), "a live flow goes on"
    clock.now += FLOW_IDLE_SECONDS / 2
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, sport=1025))  # keeps 1025 alive
    clock.now += FLOW_IDLE_SECONDS / 2 + 1
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, sport=60000)), "idle ones expired"
    assert set(policy.udp_flows) == {1025, 60000}


def test_tcp_connections_are_capped_and_end_with_fin_or_rst(policy, clock):
    """Each SYN makes passt connect a host socket: thousands from as many source ports
    would use up the host's ports and passt's descriptors."""
    for port in range(1024, 1024 + MAX_TCP_FLOWS):
        assert policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, sport=port))
    assert not policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, sport=60000)), "over the cap"
    ack = 0x10
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, sport=1024, tcp_flags=ack))
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, sport=1024, tcp_flags=0x11))  # FIN
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, sport=60000)), "the FIN made room"
    assert not policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, sport=60001))
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, sport=1025, tcp_flags=0x04))  # RST
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, sport=60001))
    clock.now += FLOW_IDLE_SECONDS + 1
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, sport=60002)), "idle ones expired"
    assert len(policy.tcp_flows) == 1


def test_frames_larger_than_the_guests_mtu_are_dropped(policy):
    header = len(ipv4_frame("8.8.8.8", 17, 53))
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, payload=MAX_GUEST_FRAME - header))
    assert not policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, sport=2000,
                                             payload=MAX_GUEST_FRAME - header + 1))  # fmt: skip
    assert not policy.allow_frame(ipv4_frame("8.8.8.8", 6, 443, payload=60_000))


def test_icmp_echo_ids_are_capped(policy, clock):
    for ident in range(MAX_ICMP_IDS):
        assert policy.allow_frame(ipv4_frame("8.8.8.8", 1, sport=ident))
    assert not policy.allow_frame(ipv4_frame("8.8.8.8", 1, sport=MAX_ICMP_IDS))
    assert not policy.allow_frame(ipv4_frame("8.8.8.8", 1, icmp_type=0)), "only echo requests"
    clock.now += FLOW_IDLE_SECONDS + 1
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 1, sport=MAX_ICMP_IDS))


def test_inbound_udp_only_from_where_the_guest_sent(policy):
    reply = inbound(ipv4_frame("10.0.2.15", 17, dport=40000, sport=53, src="8.8.8.8"))
    assert not policy.allow_inbound(reply), "nothing was sent yet"
    assert policy.allow_frame(ipv4_frame("8.8.8.8", 17, 53, sport=40000))
    assert policy.allow_inbound(reply)
    stranger = inbound(ipv4_frame("10.0.2.15", 17, dport=40000, sport=53, src="203.0.113.99"))
    other_port = inbound(ipv4_frame("10.0.2.15", 17, dport=40000, sport=54, src="8.8.8.8"))
    assert not policy.allow_inbound(stranger) and not policy.allow_inbound(other_port)
    dns = inbound(ipv4_frame("10.0.2.15", 17, dport=40001, sport=53, src="10.0.2.3"))
    assert policy.allow_frame(ipv4_frame("10.0.2.3", 17, 53, sport=40001))
    assert policy.allow_inbound(dns), "replies of the forwarded resolver"
    tcp = inbound(ipv4_frame("10.0.2.15", 6, dport=40000, sport=443, src="203.0.113.99"))
    assert policy.allow_inbound(tcp), "TCP: passt only relays connections the guest opened"


def test_local_prefix_routes_cover_the_whole_prefix(tmp_path):
    trie = tmp_path / "fib_trie"
    trie.write_text(
        "Local:\n  +-- 0.0.0.0/0 3 0 5\n"
        "     +-- 10.9.0.0/24 2 0 2\n        |-- 10.9.0.0\n           /24 host LOCAL\n"
        "     +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.0\n           /8 host LOCAL\n"
        "        |-- 127.0.0.1\n           /32 host LOCAL\n"
        "        |-- 127.255.255.255\n           /32 link BROADCAST\n"
    )
    nets = local_networks(str(trie))
    assert nets == {ipaddress.IPv4Network(n) for n in ("10.9.0.0/24", "127.0.0.0/8",
                                                        "127.0.0.1/32")}  # fmt: skip
    policy = Policy(host_nets=nets, probe=False)
    assert not policy.allow_frame(ipv4_frame("10.9.0.77", 6)), "inside a local /24"
    assert policy.allow_frame(ipv4_frame("10.9.1.77", 6))


def test_unreadable_routing_table_fails_closed(tmp_path, monkeypatch):
    with pytest.raises(HostAddressesUnknown):
        local_networks(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("Local:\n")
    with pytest.raises(HostAddressesUnknown):
        local_networks(str(empty))
    monkeypatch.setattr(netfilter, "FIB_TRIE", str(tmp_path / "missing"))
    with pytest.raises(HostAddressesUnknown):
        Policy()


def test_the_guard_says_why_and_never_ok_without_host_addresses(tmp_path, monkeypatch,
                                                                  capsys):  # fmt: skip
    monkeypatch.setattr(netfilter, "FIB_TRIE", str(tmp_path / "missing"))
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        rc = netfilter.main([str(os.dup(a.fileno())), str(os.dup(b.fileno())), str(w)])
        assert rc == 1
        assert "refusing to start the network" in capsys.readouterr().err
        os.close(w)
        assert os.read(r, 2) == b"", "it never said ok"
    finally:
        os.close(r)
        a.close()
        b.close()


def test_host_addresses_are_read_from_the_routing_table():
    addrs = host_addresses()
    assert ipaddress.IPv4Address("127.0.0.1") in addrs
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outbound address
            mine = ipaddress.IPv4Address(s.getsockname()[0])
        except OSError:
            pytest.skip("this host has no IPv4 route to check its outbound address against")
    assert mine in addrs


@pytest.mark.skipif(os.getuid() != 0, reason="adding an address to the host needs root")
def test_an_address_the_host_gains_later_is_blocked(clock):
    """The bind probe: whatever the host can bind is the host, whenever it got it. The
    guard starts, then the host gains an address: frames to it are dropped from then on."""
    import subprocess

    new = "198.51.100.213"
    policy = Policy(host_nets={ipaddress.IPv4Network("192.0.2.250/32")}, clock=clock)
    for addr in host_addresses() - {ipaddress.IPv4Address("192.0.2.250")}:
        assert policy.is_host(addr), f"{addr} is this host's (the probe must say so)"
    assert policy.allow_frame(ipv4_frame(new)), "not the host's yet (the positive control)"
    subprocess.run(["ip", "addr", "add", f"{new}/32", "dev", "lo"], check=True)
    try:
        clock.now += netfilter.HOST_CACHE_SECONDS + 1
        assert not policy.allow_frame(ipv4_frame(new)), "an address the host gained later"
    finally:
        subprocess.run(["ip", "addr", "del", f"{new}/32", "dev", "lo"], check=True)


def _stream(frames: list[bytes]) -> bytes:
    return b"".join(struct.pack("!I", len(f)) + f for f in frames)


def start_guard(policy: Policy, pacer: Pacer | None = None):
    """``guard`` on a thread between two socket pairs: (the VM's end, passt's end, thread)."""
    vm, guard_vm = socket.socketpair()
    guard_passt, passt = socket.socketpair()
    args = (guard_vm, guard_passt, policy) + ((pacer,) if pacer else ())
    t = threading.Thread(target=guard, args=args, daemon=True)
    t.start()
    return vm, passt, t


def test_guard_forwards_allowed_frames_and_drops_the_rest(policy):
    vm, passt, t = start_guard(policy)
    good, bad = ipv4_frame("203.0.113.80"), ipv4_frame("127.0.0.1", 17, 9)
    vm.sendall(_stream([bad, good, bad]))
    passt.settimeout(5)
    got = passt.recv(4 + len(good))
    assert got == struct.pack("!I", len(good)) + good
    arp = inbound(arp_frame())
    stranger = inbound(ipv4_frame("10.0.2.15", 17, dport=41000, sport=53, src="203.0.113.99"))
    passt.sendall(_stream([stranger, arp]))
    vm.settimeout(5)
    assert vm.recv(100) == _stream([arp]), "unasked-for UDP stays out, the rest passes"
    vm.close()  # the VM went away: the guard closes passt's side too
    t.join(5)
    assert not t.is_alive()
    assert passt.recv(100) == b""


def test_guard_paces_a_flooding_guest():
    policy = Policy(host_nets={ipaddress.IPv4Network("127.0.0.0/8")}, probe=False)
    vm, passt, t = start_guard(policy, Pacer(rate=2000, burst=100))
    frame = ipv4_frame("203.0.113.80")
    stop = threading.Event()

    def flood() -> None:
        blob = _stream([frame] * 200)
        while not stop.is_set():
            try:
                vm.sendall(blob)
            except OSError:
                return

    threading.Thread(target=flood, daemon=True).start()
    passt.settimeout(5)
    got, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 1.0:
        got += len(passt.recv(1 << 16))
    stop.set()
    frames = got / (4 + len(frame))
    assert 1000 < frames < 2000 + 100 + 200, f"{frames:.0f} frames passed in one second"
    vm.close()
    passt.close()
    t.join(5)
