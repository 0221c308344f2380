"""Hostile cells: each attack runs as a cell through the real kernel, and each test asserts
containment *and* that the host and a bystander kernel are fine afterwards."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from ..conftest import install_spec, processes_mentioning
from ..kernel_helpers import crash_and_reconnect, run_cell, start_kernel, stop_kernel
from .bystander import assert_bystander_fine, start_bystander
from .host_listeners import HostServer

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def attack_spec(jupyter_prefix) -> str:
    return install_spec(jupyter_prefix, "smolvm-attack", "--memory-mib", "512",
                        "--disk-mib", "128")  # fmt: skip


@pytest.fixture(scope="module")
async def bystander(attack_spec):
    """Another kernel that must keep working whatever the attacks do."""
    km, kc = await start_bystander(attack_spec)
    yield km, kc
    await stop_kernel(km, kc)


@pytest.fixture(scope="module")
async def attacker(attack_spec, bystander):
    km, kc = await start_kernel(attack_spec)
    yield km, kc
    await stop_kernel(km, kc)


CONNECT = """
import socket
results = []
for host in {hosts!r}:
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, {port})); results.append('CONNECTED ' + host)
    except OSError as e:
        results.append('blocked ' + host)
    finally:
        s.close()
print(results)
"""


async def test_cannot_read_a_host_file(attacker, bystander, tmp_path):
    _, kc = attacker
    marker = tmp_path / "marker"
    marker.write_text("host-secret-4711")
    r = await run_cell(kc, f"""
import os, subprocess
needle = 'host-secret-' + '4711'  # split, so this cell's own history does not match
found = subprocess.run(['grep', '-rls', needle, '/root', '/tmp', '/home', '/mnt', '/opt', '/srv'],
                       capture_output=True, text=True).stdout
print(os.path.exists({str(marker)!r}), repr(found))
""")  # fmt: skip
    assert r.stdout.split() == ["False", "''"]
    assert marker.read_text() == "host-secret-4711"
    await assert_bystander_fine(bystander)


async def test_cannot_reach_host_loopback_or_the_jupyter_ports(attacker, bystander):
    km, kc = attacker
    server = HostServer()
    try:
        hosts = ["127.0.0.1", "10.0.2.2", "192.168.0.1", "172.17.0.1"]
        r = await run_cell(kc, CONNECT.format(hosts=hosts, port=server.port))
        assert "CONNECTED" not in r.stdout, r.stdout
        # The kernel's own host-side ports (where the Jupyter server's clients connect).
        shell_port = km.get_connection_info()["shell_port"]
        r = await run_cell(kc, CONNECT.format(hosts=["127.0.0.1"], port=shell_port))
        assert "CONNECTED" not in r.stdout, r.stdout
        assert server.connections == 0, "the guest reached a host loopback server"
    finally:
        server.close()
    await assert_bystander_fine(bystander)


async def test_cannot_reach_host_or_other_vms_over_vsock(attacker, bystander):
    _, kc = attacker
    # CID 2 is the host; every guest is CID 3 behind its own vsock device, so CID 4 would
    # only answer if devices were shared. (CIDs 1 and 3 are this guest itself.)
    code = (
        "import socket\n"
        "reached = []\n"
        "for cid in (2, 4):\n"
        "    for port in (22, 1024, 1025, 2024, 5001):\n"
        "        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
        "        s.settimeout(1)\n"
        "        try:\n"
        "            s.connect((cid, port))\n"
        "            reached.append((cid, port))\n"
        "        except OSError:\n"
        "            pass\n"
        "        finally:\n"
        "            s.close()\n"
        "print('reached', reached)\n"
    )
    r = await run_cell(kc, code, timeout=120)
    assert r.stdout.strip() == "reached []", r.stdout
    await assert_bystander_fine(bystander)


async def test_killing_pid1_is_refused_and_the_kernel_lives(attacker, bystander):
    _, kc = attacker
    r = await run_cell(
        kc,
        """
import os, signal
for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
    os.kill(1, sig)
print('still here', open('/proc/1/cmdline').read().count('agent.py'))
""",
    )
    assert r.stdout.strip() == "still here 1"
    await assert_bystander_fine(bystander)


async def test_filling_the_disk_stops_at_the_cap(attacker, bystander):
    km, kc = attacker
    overlay = km.provisioner.vm.runtime_dir / "overlay.ext4"
    host_free = shutil.disk_usage(overlay.parent).free
    r = await run_cell(kc, """
import os
written = 0
try:
    with open('/root/fill', 'wb') as f:
        while True:
            f.write(b'\\0' * (1 << 20)); written += 1
except OSError as e:
    print('stopped', e.errno, written)
""", timeout=300)  # fmt: skip
    words = r.stdout.split()
    assert words[:2] == ["stopped", "28"], r.stdout  # ENOSPC
    assert int(words[2]) < 128
    allocated = overlay.stat().st_blocks * 512
    assert allocated <= 128 << 20, "the overlay grew past disk_mib on the host"
    assert host_free - shutil.disk_usage(overlay.parent).free < 160 << 20
    r = await run_cell(kc, "import os; os.remove('/root/fill'); print('ok')")
    assert r.stdout.strip().splitlines()[-1] == "ok"  # (IPython may first warn: disk full)
    await assert_bystander_fine(bystander)


async def test_printing_lots_of_output_keeps_host_memory_bounded(attacker, bystander):
    km, kc = attacker
    relay = km.provisioner.relay
    total = 0
    # Flushed per MiB: unflushed, ipykernel itself buffers it all and the guest OOM-kills it.
    code = (
        "import sys\n"
        "for _ in range(200):\n"
        "    sys.stdout.write('x' * 1_000_000)\n"
        "    sys.stdout.flush()\n"
    )
    msg_id = kc.execute(code)
    while True:
        msg = await kc.get_iopub_msg(timeout=180)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            total += len(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert total == 200_000_000
    # All of it went through the relay, which held at most a few chunks at any moment
    # (user-space write buffers; 0 means the sockets took every chunk at once).
    assert relay.connections > 0
    assert relay.peak_buffered <= 1 << 20, f"relay buffered {relay.peak_buffered} bytes"
    await assert_bystander_fine(bystander)


async def test_flooding_the_console_keeps_the_host_log_bounded(attacker, bystander,
                                                               monkeypatch):  # fmt: skip
    km, kc = attacker
    cap = 256 << 10
    monkeypatch.setenv("SMOL_KERNEL_CONSOLE_LOG_KIB", str(cap >> 10))
    log = km.provisioner.vm.console_log
    # Root writes the console device directly, bypassing the kernel's output budget.
    r = await run_cell(kc, """
import os, time
fd = os.open('/dev/console', os.O_WRONLY | os.O_NOCTTY)
chunk = b'flood ' * 10000 + b'\\n'
written, end = 0, time.monotonic() + 15
while time.monotonic() < end:
    written += os.write(fd, chunk)
os.close(fd)
print(written)
""", timeout=120)  # fmt: skip
    written = int(r.stdout.strip())
    assert written > 4 * cap, f"the guest wrote only {written} bytes: nothing was tested"
    await asyncio.sleep(1.5)  # the watcher's next rounds
    assert log.stat().st_blocks * 512 <= cap + (64 << 10), "the console log outgrew its cap"
    assert b"bytes of console output dropped" in log.read_bytes()
    r = await run_cell(kc, "print('still here')")
    assert r.stdout.strip() == "still here"
    await assert_bystander_fine(bystander)


async def test_fork_bomb_is_contained(attack_spec, bystander):
    km, kc = await start_kernel(attack_spec)
    rt = km.provisioner.vm.runtime_dir
    host_procs = len(os.listdir("/proc"))
    try:
        kc.execute("import subprocess\nsubprocess.Popen(['sh', '-c', 'b() { b | b & }; b'])")
        await asyncio.sleep(10)
        assert len(os.listdir("/proc")) - host_procs < 20, "guest processes leaked to the host"
        assert len(processes_mentioning(str(rt))) == 2, "still exactly one VMM and one helper"
        await assert_bystander_fine(bystander)
    finally:
        await km.shutdown_kernel(now=True)
        kc.stop_channels()
    assert processes_mentioning(str(rt)) == [] and not rt.exists()


async def test_memory_exhaustion_is_contained(attack_spec, bystander):
    # No autorestarter here: a restart racing the final shutdown would be a test artefact.
    km, kc = await start_kernel(attack_spec)
    vm_pid = km.provisioner.vm.pid
    try:
        kc.execute("chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))")
        peak = 0
        for _ in range(120):
            await asyncio.sleep(0.5)
            try:
                with open(f"/proc/{vm_pid}/status") as f:
                    rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
            except (OSError, StopIteration):
                break
            peak = max(peak, rss)
            if not await km.is_alive():
                break
        # Guest RAM is capped at 512 MiB; QEMU's own overhead stays well under 512 MiB more.
        assert peak < (1024 << 10), f"VM host RSS reached {peak >> 10} MiB"
        await assert_bystander_fine(bystander)
    finally:
        await stop_kernel(km, kc)


async def test_rebooting_the_guest_kills_only_that_kernel_and_it_restarts(attack_spec, bystander):
    km, kc = await start_kernel(attack_spec, manager_cls=AsyncIOLoopKernelManager)
    try:
        reboot = "import ctypes, os\nos.sync()\nctypes.CDLL(None).reboot(0x01234567)"
        old_vm, kc = await crash_and_reconnect(km, kc, reboot)
        r = await run_cell(kc, "print('fresh')")
        assert r.stdout.strip() == "fresh"
        assert not old_vm.runtime_dir.exists()
        await assert_bystander_fine(bystander)
    finally:
        await stop_kernel(km, kc)
