"""Hostile cells: each attack runs as a cell through the real kernel, and each test asserts
containment *and* that the host and a bystander kernel are fine afterwards."""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import time
from pathlib import Path

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from smol_kernel.trusted import trusted_path

from ..conftest import install_spec, processes_mentioning
from ..kernel_helpers import crash_and_reconnect, run_cell, start_kernel, stop_kernel
from .bystander import assert_bystander_fine, start_bystander
from .host_listeners import HostServer

pytestmark = pytest.mark.vm
BACKLOG_MIB = 16  # what the relay may hold for a slow client of the attacker's output


@pytest.fixture(scope="module")
def attack_spec(jupyter_prefix) -> str:
    return install_spec(jupyter_prefix, "smolvm-attack", "--backend", "qemu", "--memory-mib",
                        "512", "--disk-mib", "128", "--max-processes", "256",
                        "--iopub-backlog-mib", str(BACKLOG_MIB))  # fmt: skip


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
        # Positive controls: the host server answers on the host, and the probe reports a
        # connection it does make (to a listener on the guest's own loopback).
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
        deadline = time.monotonic() + 5
        while server.connections < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert server.connections == 1, "the host server is not listening"
        r = await run_cell(kc, "import socket\nlistener = socket.socket()\n"
                           f"listener.bind(('127.0.0.1', {server.port})); listener.listen()\n"
                           + CONNECT.format(hosts=["127.0.0.1"], port=server.port))  # fmt: skip
        assert r.stdout.strip() == "['CONNECTED 127.0.0.1']", r.stdout
        r = await run_cell(kc, "listener.close()")
        hosts = ["127.0.0.1", "10.0.2.2", "192.168.0.1", "172.17.0.1"]
        r = await run_cell(kc, CONNECT.format(hosts=hosts, port=server.port))
        assert r.status == "ok", (r.ename, r.evalue)
        assert r.stdout.strip() == str([f"blocked {h}" for h in hosts])
        # The kernel's own host-side ports (where the Jupyter server's clients connect).
        shell_port = km.get_connection_info()["shell_port"]
        r = await run_cell(kc, CONNECT.format(hosts=["127.0.0.1"], port=shell_port))
        assert r.status == "ok", (r.ename, r.evalue)
        assert r.stdout.strip() == "['blocked 127.0.0.1']"
        assert server.connections == 1, "the guest reached a host loopback server"
    finally:
        server.close()
    await assert_bystander_fine(bystander)


VSOCK_DIAL = """
import socket
reached, errors = [], set()
for cid in (1, 2, 3, 4):
    for port in {ports!r}:
        try:
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            s.settimeout(1)
            s.connect((cid, port)); reached.append((cid, port))
        except OSError as e:
            errors.add(e.errno)
print('reached', reached, 'errors', sorted(errors))
"""


async def test_guests_have_no_vsock_and_each_port_leads_to_its_own_host_end(attacker,
                                                                            bystander):  # fmt: skip
    """QEMU guests have no vsock device: every stream goes through the VM's own
    virtio-serial port, whose host end is a socket in its own runtime folder."""
    km, kc = attacker
    other_km, other_kc = bystander
    vm, other = km.provisioner.vm, other_km.provisioner.vm
    ports = [22, 1024, 1025, 2024, 5001]
    for client in (kc, other_kc):
        r = await run_cell(client, VSOCK_DIAL.format(ports=ports), timeout=120)
        assert r.status == "ok", (r.ename, r.evalue)
        assert r.stdout.startswith("reached [] "), r.stdout
    # Each QEMU's port is connected to its own VM's socket, and nothing else's.
    for one, two in ((vm, other), (other, vm)):
        argv = Path(f"/proc/{one.pid}/cmdline").read_bytes().decode()
        assert str(one.runtime_dir / "mux.sock") in argv
        assert str(two.runtime_dir) not in argv

    # The positive control: the host reaches the guest's agent through that port.
    async def ping() -> bytes:
        reader, writer = await vm.open_stream(1024)
        writer.write(b'{"op": "ping", "id": 1}\n')
        try:
            return await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()

    from smol_kernel.ioloop import on_io_loop

    assert b'"ok":true' in await on_io_loop(ping())
    await assert_bystander_fine(bystander)


async def test_the_serial_port_is_the_agents_alone(attacker, bystander):
    """Root in the guest cannot open the port the agent holds (virtio-serial ports open
    once: EBUSY), so what comes out of it is the agent's framing. (A guest kernel that
    wrote garbage anyway ends only its own VM's streams: tests/test_serial_mux.py.)"""
    _, kc = attacker
    r = await run_cell(kc, "import os, glob, errno\n"
                       "port = [p for p in glob.glob('/sys/class/virtio-ports/*') "
                       "if open(p + '/name').read().strip() == 'smol.mux'][0]\n"
                       "dev = '/dev/' + port.rsplit('/', 1)[1]\n"
                       "try:\n    os.open(dev, os.O_WRONLY); print('opened')\n"
                       "except OSError as e:\n"
                       "    print(errno.errorcode[e.errno], dev)")  # fmt: skip
    assert r.stdout.startswith("EBUSY /dev/vport"), r.stdout
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
    # Everything this VM may write on the host is in its runtime folder (measured there:
    # the host's free space also moves with what other tests write meanwhile).
    held = sum(p.stat().st_blocks * 512 for p in overlay.parent.rglob("*") if p.is_file())
    assert held < 160 << 20, f"the VM's files hold {held >> 20} MiB on the host"
    r = await run_cell(kc, "import os; os.remove('/root/fill'); print('ok')")
    assert r.stdout.strip().splitlines()[-1] == "ok"  # (IPython may first warn: disk full)
    await assert_bystander_fine(bystander)


async def test_printing_lots_of_output_keeps_host_memory_bounded(attacker, bystander):
    """200 MB printed to a client that reads slowly (2 messages a second): the relay holds
    at most the kernel's iopub_backlog_mib for it and drops the rest, and the client is
    told. Without the cap the relay (or the client's socket) would hold what it has not
    read; the peak shows it did hold a backlog, so the cap was what kept it there."""
    km, kc = attacker
    gate = km.provisioner.relay.gate
    dropped_before = gate.dropped_messages
    gate.peak_backlog = 0
    # Flushed per MiB: unflushed, ipykernel itself buffers it all and the guest OOM-kills it.
    code = (
        "import sys\n"
        "for _ in range(200):\n"
        "    sys.stdout.write('x' * 1_000_000)\n"
        "    sys.stdout.flush()\n"
    )
    msg_id = kc.execute(code)
    received, notes, idle = 0, "", False
    while not (idle and "dropped" in notes):
        msg = await kc.get_iopub_msg(timeout=180)
        if msg["msg_type"] == "stream":
            if msg["header"].get("session") == "smol-kernel-relay":
                notes += msg["content"]["text"]
            elif msg["parent_header"].get("msg_id") == msg_id:
                received += len(msg["content"]["text"])
                await asyncio.sleep(0.5)  # slower than a TCG guest under load writes
        if (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"].get("msg_id") == msg_id):  # fmt: skip
            idle = True
    assert gate.dropped_messages > dropped_before and received < 200_000_000
    assert "iopub_backlog_mib" in notes
    assert 8 << 20 <= gate.peak_backlog <= (BACKLOG_MIB + 2) << 20, gate.peak_backlog
    await assert_bystander_fine(bystander)


async def test_vmm_runs_under_seccomp_and_helpers_get_only_path(attacker):
    km, _ = attacker
    vm = km.provisioner.vm
    status = Path(f"/proc/{vm.pid}/status").read_text()
    assert "\nSeccomp:\t2\n" in status, "QEMU runs without its seccomp filter (-sandbox on)"
    pids = vm.rt.read_state()["pids"]
    assert len(pids) >= 1  # QEMU (network helpers too, when on)
    for name, pid in pids.items():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert environ == [f"PATH={trusted_path()}".encode(), b""], (name, environ)
        assert os.readlink(f"/proc/{pid}/cwd") == str(vm.runtime_dir), name


KERNEL_PIPE_FLOOD = """
import os
def link(path):
    try:
        return os.readlink(path)
    except OSError:
        return ''
agent = {link(f'/proc/1/fd/{f}') for f in os.listdir('/proc/1/fd')}
# (3 and 4 are the launcher's claim and status pipes with the agent, not its output)
fd = next(int(f) for f in os.listdir('/proc/self/fd') if f not in ('3', '4')
          and link(f'/proc/self/fd/{f}').startswith('pipe:')
          and link(f'/proc/self/fd/{f}') in agent)
for _ in range(64):
    os.write(fd, b'k' * 16384)
print('ok')
"""


async def test_kernel_output_reaches_the_console_log_only_up_to_64_kib(attacker, bystander):
    km, kc = attacker
    log = km.provisioner.vm.console_log
    before = log.stat().st_size
    # The kernel process's own output pipe (ipykernel redirects fd 1 to the notebook): the
    # agent copies what comes through it to the serial console, up to a budget per kernel.
    r = await run_cell(kc, KERNEL_PIPE_FLOOD)
    assert r.stdout.strip() == "ok", (r.stdout[:200], r.evalue)
    await asyncio.sleep(1)
    grown = log.stat().st_size - before
    assert 0 < grown <= (64 << 10) + 256, f"console log grew by {grown} bytes"
    assert b"further kernel output not logged" in log.read_bytes()
    await assert_bystander_fine(bystander)


INTERRUPT_CHILD = """
import subprocess, sys
p = subprocess.Popen(['sh', '-c', 'trap "echo child-got-INT; exit 3" INT; '
                      'echo child-started; while :; do sleep 0.2; done'],
                     stdout=subprocess.PIPE, text=True)
print(p.stdout.readline().strip(), flush=True)
p.wait()
"""

ZOMBIES = """
import os, time
p.wait(timeout=10)  # the kernel reaps its own child; PID 1 must reap any orphan
time.sleep(1)
def state(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return None
zombies = [p for p in os.listdir('/proc') if p.isdigit() and state(p) == 'Z']
print(p.returncode, p.stdout.read().strip(), zombies)
"""


async def test_interrupt_reaches_child_processes_and_leaves_no_zombies(attacker, bystander):
    km, kc = attacker
    msg_id = kc.execute(INTERRUPT_CHILD)
    while True:  # wait until the child runs
        msg = await kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            assert msg["content"]["text"].strip() == "child-started"
            break
    await km.interrupt_kernel()
    reply = await kc.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    while True:  # ipykernel aborts what arrives while it handles the error: let it finish
        msg = await kc.get_iopub_msg(timeout=60)
        mine = msg["parent_header"].get("msg_id") == msg_id
        if mine and msg["content"].get("execution_state") == "idle":
            break
    await asyncio.sleep(1)
    r = await run_cell(kc, ZOMBIES)
    assert r.stdout.strip() == "3 child-got-INT []", (r, reply["content"]["status"])
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
        kc.execute("import subprocess\nsubprocess.Popen(['sh', '-c', 'b() { b | b & }; b'], "
                   "stderr=open('/tmp/bomb.err', 'w'))")  # fmt: skip
        await asyncio.sleep(10)
        assert len(os.listdir("/proc")) - host_procs < 20, "guest processes leaked to the host"
        assert len(processes_mentioning(str(rt))) == 1, "still exactly one VMM"
        # In the guest: forking hit the kernel's process cap, and the kernel still answers.
        r = await run_cell(kc, """
failed = open('/tmp/bomb.err').read().count('Cannot fork')
cg = '/sys/fs/cgroup/kernel/'
print(failed > 0, open(cg + 'pids.max').read().strip(), int(open(cg + 'pids.current').read()))
""", timeout=240)  # fmt: skip
        failed, cap, current = r.stdout.split()
        assert failed == "True", r.stdout
        assert cap == "256" and int(current) <= 256, r.stdout
        await assert_bystander_fine(bystander)
    finally:
        await km.shutdown_kernel(now=True)
        kc.stop_channels()
    assert processes_mentioning(str(rt)) == [] and not rt.exists()


async def test_memory_exhaustion_is_contained(attack_spec, bystander):
    # No autorestarter here: a restart racing the final shutdown would be a test artefact.
    km, kc = await start_kernel(attack_spec)
    vm = km.provisioner.vm
    try:
        kc.execute(
            "chunks = []\nwhile True:\n"
            "    chunks.append(bytearray(32 << 20)); print(len(chunks) * 32, flush=True)"
        )
        peak = allocated = 0
        console = ""
        for _ in range(240):
            try:
                msg = await kc.get_iopub_msg(timeout=0.5)
                if msg["msg_type"] == "stream":  # (a message may hold several, or none)
                    for number in msg["content"]["text"].split():
                        allocated = max(allocated, int(number))
            except (queue.Empty, asyncio.TimeoutError):
                pass
            try:
                with open(f"/proc/{vm.pid}/status") as f:
                    rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
                peak = max(peak, rss)
            except (OSError, StopIteration):
                pass
            console = vm.console_tail(16384) or console
            if not await km.is_alive():
                break
        assert allocated >= 256, f"the guest allocated only {allocated} MiB: nothing was tested"
        # The measurement saw the guest's memory (it would read 0 if it never could).
        assert peak >= 200 << 10, f"VM host RSS peaked at {peak >> 10} MiB: not measured"
        assert "Out of memory: Killed process" in console, console[-2000:]
        # Guest RAM is capped at 512 MiB; QEMU's own overhead stays well under 512 MiB more.
        assert peak < (1024 << 10), f"VM host RSS reached {peak >> 10} MiB"
        await assert_bystander_fine(bystander)
    finally:
        await stop_kernel(km, kc)


@pytest.mark.parametrize("crash", [
    "import ctypes, os\nos.sync()\nctypes.CDLL(None).reboot(0x01234567)",  # reboot(2)
    "open('/proc/sysrq-trigger', 'w').write('c')",  # a guest kernel panic
], ids=["reboot", "panic"])  # fmt: skip
async def test_crashing_the_guest_kills_only_that_kernel_and_it_restarts(attack_spec, bystander,
                                                                         crash):  # fmt: skip
    km, kc = await start_kernel(attack_spec, manager_cls=AsyncIOLoopKernelManager)
    try:
        old_vm, kc = await crash_and_reconnect(km, kc, crash)
        assert old_vm.poll() is not None
        r = await run_cell(kc, "print('fresh')")
        assert r.stdout.strip() == "fresh"
        assert not old_vm.runtime_dir.exists()
        await assert_bystander_fine(bystander)
    finally:
        await stop_kernel(km, kc)
