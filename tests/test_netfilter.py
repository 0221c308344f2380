"""The network guard's policy and its forwarding, on frames built here (no VM needed; the
end-to-end attacks are in tests/security/test_network.py)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

import pytest

from smol_kernel.vm.netfilter import Policy, guard, host_addresses

GUEST_MAC = bytes.fromhex("525400123456")
PASST_MAC = bytes.fromhex("02fc00000001")
HOST_ADDR = "198.51.100.7"


def ipv4_frame(dst: str, proto: int = 6, dport: int = 80, frag: int = 0, ihl: int = 5) -> bytes:
    l4 = struct.pack("!HHI", 40000, dport, 0) + bytes(12)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), 1, frag, 64, proto, 0,
        socket.inet_aton("10.0.2.15"), socket.inet_aton(dst),
    ) + bytes((ihl - 5) * 4)  # fmt: skip
    return PASST_MAC + GUEST_MAC + b"\x08\x00" + ip + l4


@pytest.fixture
def policy() -> Policy:
    return Policy(host_addrs={ipaddress.IPv4Address(HOST_ADDR)})


@pytest.mark.parametrize(
    "dst",
    ["127.0.0.1", "127.1.2.3", "0.0.0.0", "169.254.169.254", "224.0.0.251", "255.255.255.255",
     "10.0.2.2", "10.0.2.100", HOST_ADDR],
)  # fmt: skip
def test_frames_for_the_host_are_dropped(policy, dst):
    assert not policy.allow_frame(ipv4_frame(dst, 6))
    assert not policy.allow_frame(ipv4_frame(dst, 17))


def test_outside_addresses_pass(policy):
    for dst in ("203.0.113.80", "8.8.8.8", "10.203.0.2", "192.168.1.1"):
        assert policy.allow_frame(ipv4_frame(dst, 6))
        assert policy.allow_frame(ipv4_frame(dst, 17))


def test_only_dns_reaches_the_dns_address(policy):
    assert policy.allow_frame(ipv4_frame("10.0.2.3", 17, 53))
    assert policy.allow_frame(ipv4_frame("10.0.2.3", 6, 53))
    assert policy.allow_frame(ipv4_frame("10.0.2.3", 17, 53, ihl=6)), "IP options are fine"
    assert not policy.allow_frame(ipv4_frame("10.0.2.3", 6, 22))
    assert not policy.allow_frame(ipv4_frame("10.0.2.3", 1, 53)), "ICMP is not DNS"
    assert not policy.allow_frame(ipv4_frame("10.0.2.3", 17, 53, frag=5)), "no L4 header"


def test_arp_passes_and_other_protocols_do_not(policy):
    arp = PASST_MAC + GUEST_MAC + b"\x08\x06" + bytes(28)
    assert policy.allow_frame(arp)
    ipv6 = PASST_MAC + GUEST_MAC + b"\x86\xdd" + bytes(60)
    assert not policy.allow_frame(ipv6)
    assert not policy.allow_frame(ipv4_frame("8.8.8.8")[:30]), "truncated"
    assert not policy.allow_frame(b"")
    bad_version = bytearray(ipv4_frame("8.8.8.8"))
    bad_version[14] = 0x65
    assert not policy.allow_frame(bytes(bad_version))


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


def test_guard_forwards_allowed_frames_and_drops_the_rest(policy):
    vm, guard_vm = socket.socketpair()
    guard_passt, passt = socket.socketpair()
    t = threading.Thread(target=guard, args=(guard_vm, guard_passt, policy), daemon=True)
    t.start()
    good, bad = ipv4_frame("203.0.113.80"), ipv4_frame("127.0.0.1", 17, 9)
    for frame in (bad, good, bad):
        vm.sendall(struct.pack("!I", len(frame)) + frame)
    passt.settimeout(5)
    got = passt.recv(4 + len(good))
    assert got == struct.pack("!I", len(good)) + good
    reply = struct.pack("!I", 3) + b"abc"
    passt.sendall(reply)
    vm.settimeout(5)
    assert vm.recv(100) == reply, "passt -> guest passes unchanged"
    vm.close()  # the VM went away: the guard closes passt's side too
    t.join(5)
    assert not t.is_alive()
    assert passt.recv(100) == b""
