"""network=True: the guest reaches the outside (a test host in a network namespace, by name),
and still never the host itself -- loopback, gateway tricks, the host's own addresses,
link-local, or raw Ethernet frames. Each attack asserts containment and a fine bystander."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

from smol_kernel.cli import main as cli_main
from smol_kernel.egress.netfilter import MAX_UDP_FLOWS, host_addresses
from smol_kernel.vm.process import proc_start_time

from ..conftest import install_spec
from ..kernel_helpers import run_cell, start_kernel, stop_kernel
from .bystander import assert_bystander_fine, start_bystander
from .host_listeners import HostServer, HostUdpServer
from .netns import outside_network

pytestmark = pytest.mark.vm
SERVICES = Path(__file__).with_name("netns_services.py")
TEST_HOST_NAME = "smol-test-host.internal"


@pytest.fixture(scope="module")
def test_host():
    """A host in its own network namespace behind a veth pair: HTTP on :8080 and DNS."""
    marker = f"marker-{os.getpid()}"

    def services(addrs: list[str]) -> list[str]:
        return [sys.executable, str(SERVICES), addrs[0], "8080", TEST_HOST_NAME, marker]

    with outside_network("smoltest", 203, 1, services) as addrs:
        yield {"ip": addrs[0], "marker": marker}


@pytest.fixture(scope="module")
def net_spec(jupyter_prefix, test_host) -> str:
    # QEMU-specific assertions below (its helper processes); libkrun has its own tests.
    return install_spec(jupyter_prefix, "smolvm-net", "--backend", "qemu", "--network",
                        "--dns-server", test_host["ip"], "--memory-mib", "512")  # fmt: skip


@pytest.fixture(scope="module")
async def bystander(jupyter_prefix):
    spec = install_spec(jupyter_prefix, "smolvm-net-bystander", "--backend", "qemu",
                        "--memory-mib", "512")  # fmt: skip
    km, kc = await start_bystander(spec)
    yield km, kc
    await stop_kernel(km, kc)


@pytest.fixture(scope="module")
async def net_kernel(net_spec, bystander):
    km, kc = await start_kernel(net_spec)
    yield km, kc
    await stop_kernel(km, kc)


UDP_PORT = 9999  # netns_services.py: records datagrams, answers "echo" and a stranger's


def udp_log(test_host, reset: bool = False) -> dict:
    """What the test host's UDP service received (no proxy: the test host is on a veth)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://{test_host['ip']}:8080/udp{'/reset' if reset else ''}"
    return json.loads(opener.open(url, timeout=10).read())


FETCH = f"""
import socket, urllib.request
print(socket.gethostbyname({TEST_HOST_NAME!r}))
print(urllib.request.urlopen('http://{TEST_HOST_NAME}:8080/marker', timeout=30).read().decode())
"""


async def test_guest_reaches_a_test_host_by_name(net_kernel, test_host, bystander, capsys):
    km, kc = net_kernel
    r = await run_cell(kc, FETCH, timeout=120)
    assert r.status == "ok", (r.ename, r.evalue)
    assert r.stdout.split() == [test_host["ip"], test_host["marker"]]
    assert cli_main(["ps", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["kernel_id"] == km.kernel_id]
    assert rows[0]["network"] is True, "ps shows which kernels have network"
    await assert_bystander_fine(bystander)


ASK_PASST_DNS = """
import socket, struct
q = b'\\x12\\x34\\x01\\x00\\x00\\x01' + bytes(6)
q += b''.join(bytes([len(p)]) + p.encode() for p in {name!r}.split('.'))
q += b'\\x00\\x00\\x01\\x00\\x01'
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)
s.sendto(q, ('10.0.2.3', 53))
r = s.recv(2048)
pos, addrs = len(q), []
for _ in range(struct.unpack_from('!H', r, 6)[0]):
    pos += 2  # compressed name pointer
    rtype, _, _, rdlen = struct.unpack_from('!HHIH', r, pos); pos += 10
    if rtype == 1:
        addrs.append(socket.inet_ntoa(r[pos:pos + 4]))
    pos += rdlen
print(sorted(addrs))
"""


async def test_default_dns_is_the_hosts_resolver(net_kernel, bystander):
    """Without dns_servers, 10.0.2.3 is the host's resolver (passt --dns-forward)."""
    for name in ("pypi.org", "deb.debian.org"):
        try:
            host_view = sorted(set(socket.gethostbyname_ex(name)[2]))
            break
        except OSError:
            continue
    else:
        pytest.skip("the host itself cannot resolve pypi.org or deb.debian.org")
    _, kc = net_kernel
    r = await run_cell(kc, ASK_PASST_DNS.format(name=name), timeout=60)
    assert r.status == "ok", (r.ename, r.evalue)
    assert r.stdout.strip() == str(host_view)
    await assert_bystander_fine(bystander)


# Ethernet frames built by hand, as root in the guest can: the guest kernel never sends
# 127.0.0.1 out of eth0, but a raw socket can.
RAW_FRAMES = """
import socket, struct, time
def csum(b):
    if len(b) % 2: b += b'\\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
def ip(dst, proto, payload):
    h = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                    socket.inet_aton('10.0.2.15'), socket.inet_aton(dst))
    return h[:10] + struct.pack('!H', csum(h)) + h[12:] + payload
def l4(dst, proto, dport, payload=b''):
    if proto == 6:
        seg = struct.pack('!HHIIBBHHH', 40000, dport, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    else:
        seg = struct.pack('!HHHH', 40001, dport, 8 + len(payload), 0) + payload
    pseudo = (socket.inet_aton('10.0.2.15') + socket.inet_aton(dst)
              + struct.pack('!BBH', 0, proto, len(seg)))
    at = 16 if proto == 6 else 6
    return seg[:at] + struct.pack('!H', csum(pseudo + seg)) + seg[at + 2:]
arp = [l.split() for l in open('/proc/net/arp').read().splitlines()[1:]]
gw_mac = bytes.fromhex(arp[0][3].replace(':', '')) if arp else b'\\xff' * 6
my_mac = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind(('eth0', 0))
for dst in {dsts!r}:
    for proto, port in ((6, {tcp_port}), (17, {udp_port})):
        raw.send(gw_mac + my_mac + b'\\x08\\x00' + ip(dst, proto, l4(dst, proto, port, b'hi')))
time.sleep(2)
print('sent')
"""

SOCKETS = """
import socket, time
reached = []
for host in {hosts!r}:
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect((host, {tcp_port})); reached.append(host)
    except OSError:
        pass
    finally:
        s.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b'hi', (host, {udp_port})); u.close()
time.sleep(2)
print('reached', reached)
"""


async def test_host_stays_unreachable_with_network_on(net_kernel, test_host, bystander):
    km, kc = net_kernel
    # Listeners on host loopback and on every host address (a server bound to all interfaces).
    tcp_lo, udp_lo = HostServer("127.0.0.1"), HostUdpServer("127.0.0.1")
    tcp_any = HostServer("0.0.0.0", 0)
    udp_any = HostUdpServer("0.0.0.0", 0)
    try:
        host_ips = sorted(str(a) for a in host_addresses())
        assert test_host["ip"] not in host_ips
        # Positive control: the same hand-built frames, sent to the outside, do arrive.
        udp_log(test_host, reset=True)
        r = await run_cell(kc, RAW_FRAMES.format(dsts=[test_host["ip"]], tcp_port=8080,
                                                 udp_port=UDP_PORT))  # fmt: skip
        assert r.stdout.strip() == "sent", (r.stdout, r.evalue)
        assert udp_log(test_host)["payloads"] == ["hi"], "a raw frame to the outside was lost"
        # ... and the socket probe below reaches an outside TCP service (it can say so).
        r = await run_cell(kc, SOCKETS.format(hosts=[test_host["ip"]], tcp_port=8080,
                                              udp_port=UDP_PORT), timeout=120)  # fmt: skip
        assert r.stdout.strip() == f"reached {[test_host['ip']]}", r.stdout
        for tcp, udp in ((tcp_lo, udp_lo), (tcp_any, udp_any)):
            hosts = ["10.0.2.2", "10.0.2.3", "169.254.169.254", *host_ips]
            r = await run_cell(kc, SOCKETS.format(hosts=hosts, tcp_port=tcp.port,
                                                  udp_port=udp.port), timeout=180)  # fmt: skip
            assert r.stdout.strip() == "reached []", r.stdout
            raw = RAW_FRAMES.format(dsts=["127.0.0.1", *host_ips], tcp_port=tcp.port,
                                    udp_port=udp.port)  # fmt: skip
            r = await run_cell(kc, raw)
            assert r.stdout.strip() == "sent", (r.stdout, r.evalue)
        # The Jupyter side of this very kernel: its shell port on host loopback.
        shell = km.get_connection_info()["shell_port"]
        r = await run_cell(kc, RAW_FRAMES.format(dsts=["127.0.0.1"], tcp_port=shell,
                                                 udp_port=shell))  # fmt: skip
        assert r.stdout.strip() == "sent"
        await asyncio.sleep(1)
        assert (tcp_lo.connections, udp_lo.datagrams) == (0, 0), "reached host loopback"
        assert (tcp_any.connections, udp_any.datagrams) == (0, 0), "reached a host address"
    finally:
        for server in (tcp_lo, udp_lo, tcp_any, udp_any):
            server.close()
    # The attacks broke nothing: the kernel still has its network, the bystander is fine.
    r = await run_cell(kc, FETCH, timeout=120)
    assert test_host["marker"] in r.stdout
    await assert_bystander_fine(bystander)


INBOUND = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('', 33333)); s.settimeout(3)
s.sendto(b'ping', ({ip!r}, {port}))
got = []
try:
    while True:
        got.append(s.recv(64).decode())
except socket.timeout:
    pass
print(sorted(got))
"""


async def test_inbound_udp_comes_only_from_where_the_guest_sent(net_kernel, test_host,
                                                                bystander):  # fmt: skip
    """passt keeps a host UDP socket open for each guest source port: without the guard's
    inbound filter anyone could send to the guest through it."""
    _, kc = net_kernel
    r = await run_cell(kc, INBOUND.format(ip=test_host["ip"], port=UDP_PORT), timeout=60)
    assert r.status == "ok", (r.ename, r.evalue)
    # The peer's answer arrives; the same host's datagram from another port does not.
    assert r.stdout.strip() == "['echo']", r.stdout
    await assert_bystander_fine(bystander)


UDP_FLOOD = """
import socket
sent = 0
for port in range(20000, 20000 + {n}):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('', port)); s.sendto(b'flood', ({ip!r}, {udp_port})); s.close()
    sent += 1
print(sent)
"""


async def test_udp_flows_per_vm_are_capped(net_spec, test_host, bystander):
    """One datagram from each of many source ports: passt would bind a host port for each
    (on 0.0.0.0, for minutes), so the guard lets only MAX_UDP_FLOWS live flows through."""
    km, kc = await start_kernel(net_spec)  # its own VM: its flow table ends up full
    try:
        passt = next(p for p in km.provisioner.vm.rt.read_state()["pids"].values()
                     if "passt" in Path(f"/proc/{p}/cmdline").read_text())  # fmt: skip
        udp_log(test_host, reset=True)
        n = 3 * MAX_UDP_FLOWS
        r = await run_cell(kc, UDP_FLOOD.format(n=n, ip=test_host["ip"], udp_port=UDP_PORT),
                           timeout=300)  # fmt: skip
        assert r.stdout.strip() == str(n), (r.stdout, r.evalue)
        await asyncio.sleep(2)
        ports = udp_log(test_host)["ports"]
        assert MAX_UDP_FLOWS // 2 <= len(ports) <= MAX_UDP_FLOWS, len(ports)
        sockets = [f for f in os.listdir(f"/proc/{passt}/fd")
                   if os.readlink(f"/proc/{passt}/fd/{f}").startswith("socket:")]  # fmt: skip
        assert len(sockets) <= MAX_UDP_FLOWS + 64, f"passt holds {len(sockets)} sockets"
        # The host itself still has ephemeral UDP ports.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            assert s.getsockname()[1] > 0
    finally:
        await stop_kernel(km, kc)
    await assert_bystander_fine(bystander)


def _running(pid: int, start: int | None) -> bool:
    """Still running as the same process (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and proc_start_time(pid) == start


async def _wait_gone(pids: dict[int, int | None], timeout: float) -> list[int]:
    for _ in range(int(timeout * 10)):
        if not any(_running(p, s) for p, s in pids.items()):
            break
        await asyncio.sleep(0.1)
    return [p for p, s in pids.items() if _running(p, s)]


async def test_network_helpers_end_with_their_vm(net_spec, bystander):
    km, kc = await start_kernel(net_spec)
    try:
        vm = km.provisioner.vm
        pids = vm.rt.read_state()["pids"]
        helpers = {pid: proc_start_time(pid) for name, pid in pids.items() if name != "vmm"}
        assert len(helpers) == 2, "passt and its guard"
        net = dict(helpers)
        os.kill(vm.pid, signal.SIGKILL)  # the VMM dies; nothing of ours has noticed yet
        # passt and the guard see their link close and exit by themselves ...
        assert await _wait_gone(net, 10) == [], "the network proxy outlived its VM"
        # ... and the VM's poll ends whatever helper is left.
        assert vm.poll() is not None
        assert await _wait_gone(helpers, 5) == []
    finally:
        await stop_kernel(km, kc)
    await assert_bystander_fine(bystander)


async def test_a_pooled_network_vm_keeps_the_guard(jupyter_prefix, test_host, bystander):
    """A warm-pool VM booted with network=True gets the same passt + guard as a cold one,
    and after the claim the outside is reachable and the host is not."""
    from ..conftest import close_warm_pool
    from ..kernel_helpers import fill_pool

    spec = install_spec(jupyter_prefix, "smolvm-net-pooled", "--backend", "qemu", "--network",
                        "--dns-server", test_host["ip"], "--memory-mib", "512",
                        "--pool-size", "1")  # fmt: skip
    await fill_pool(spec)
    km, kc = await start_kernel(spec)
    tcp_any, udp_any = HostServer("0.0.0.0", 0), HostUdpServer("0.0.0.0", 0)
    try:
        assert km.provisioner.start_kind == "pooled"
        pids = km.provisioner.vm.rt.read_state()["pids"]
        assert len(pids) == 3, "VMM, passt and its guard"
        assert all(proc_start_time(p) for p in pids.values()), "a helper is gone"
        r = await run_cell(kc, FETCH, timeout=120)
        assert test_host["marker"] in r.stdout, (r.stdout, r.evalue)
        hosts = ["10.0.2.2", *sorted(str(a) for a in host_addresses())]
        r = await run_cell(kc, SOCKETS.format(hosts=hosts, tcp_port=tcp_any.port,
                                              udp_port=udp_any.port), timeout=180)  # fmt: skip
        assert r.stdout.strip() == "reached []", r.stdout
        await asyncio.sleep(1)
        assert (tcp_any.connections, udp_any.datagrams) == (0, 0), "reached a host address"
    finally:
        tcp_any.close()
        udp_any.close()
        await stop_kernel(km, kc)
        close_warm_pool()
    await assert_bystander_fine(bystander)
