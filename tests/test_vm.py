"""The VM layer against real QEMU microVMs: boot, streams, isolation, cleanup, bad specs."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from smol_kernel.agent_client import GuestAgent
from smol_kernel.guest import protocol as P
from smol_kernel.image.store import ImageNotFound
from smol_kernel.vm.base import BackendUnavailable, VmError
from smol_kernel.vm.process import reap_orphans
from smol_kernel.vm.qemu import QemuBackend
from smol_kernel.vm.select import select_backend
from smol_kernel.vm.share import parse_share
from smol_kernel.vm.spec import Isolation, VmSpec, VmSpecError

from .conftest import BOOT_TIMEOUT, processes_mentioning, runtime_entries, vmm_accel

pytestmark = pytest.mark.vm


async def boot(backend: QemuBackend, **spec):
    vm = await backend.start(VmSpec(**spec))
    try:
        agent = await GuestAgent.connect(vm, BOOT_TIMEOUT)
    except BaseException:
        await vm.close()
        raise
    return vm, agent


async def run_to_exit(vm, agent, argv: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` as the VM's one 'kernel' process; return (exit status, output tail)."""
    await agent.request(P.OP_START_KERNEL, argv=argv, env={"PATH": "/usr/bin:/bin"},
                        cwd="/root", connection={"key": ""})  # fmt: skip
    await asyncio.wait_for(agent.kernel_exited.wait(), timeout)
    return agent.kernel_exit_status, agent.kernel_output_tail


@pytest.fixture(scope="module")
async def shared_vm(qemu_backend):
    vm, agent = await boot(qemu_backend)
    yield vm, agent
    await agent.close()
    await vm.close()


async def test_boot_reports_ready_and_isolation(shared_vm, qemu_backend, image):
    vm, agent = shared_vm
    assert agent.hello["ok"] is True
    assert agent.hello["pid"] == 1, "the agent must be the guest's PID 1"
    assert agent.hello["kernel_release"] == image.kernel_release
    assert str(vm.isolation) == vmm_accel(vm.pid), "reported isolation is the VMM's real one"
    assert vm.isolation in (Isolation.KVM, Isolation.TCG)
    assert vm.poll() is None
    reply = await agent.request(P.OP_PING)
    assert reply["ok"] is True


async def test_unknown_op_is_an_error_not_a_crash(shared_vm):
    vm, agent = shared_vm
    with pytest.raises(Exception, match="unknown op"):
        await agent.request("no-such-op")
    assert (await agent.request(P.OP_PING))["ok"]
    assert vm.poll() is None


async def test_stream_to_closed_guest_port_is_refused(shared_vm):
    vm, _ = shared_vm
    with pytest.raises(ConnectionRefusedError):
        await vm.open_stream(4444)


ECHO_SERVER = textwrap.dedent(
    """
    import socket, signal, sys
    signal.signal(signal.SIGINT, lambda *a: (print("got SIGINT", flush=True), sys.exit(7)))
    s = socket.create_server(("127.0.0.1", {port}))
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        while data := c.recv(65536):
            c.sendall(data)
        c.close()
    """
)


async def test_stream_round_trips_bytes_and_signal_reaches_guest_process(qemu_backend):
    """Bytes go host -> serial port -> agent -> guest TCP port and back, unchanged, with a
    payload far larger than any buffer (so backpressure is exercised); then SIGINT from
    the host reaches the guest process, whose exit powers the VM off."""
    vm, agent = await boot(qemu_backend)
    try:
        code = ECHO_SERVER.format(port=P.KERNEL_PORTS["shell"])
        await agent.request(P.OP_START_KERNEL, argv=["python3", "-c", code],
                            env={"PATH": "/usr/bin:/bin"}, cwd="/root",
                            connection={"key": ""})  # fmt: skip
        payload = os.urandom(8 << 20)
        deadline = time.monotonic() + 60
        while True:  # the guest process needs a moment to listen
            writer = None
            try:
                reader, writer = await vm.open_stream(P.CHANNEL_PORTS["shell"])
                writer.write(b"x")
                if await asyncio.wait_for(reader.readexactly(1), 5) == b"x":
                    break
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                if writer is not None:
                    writer.close()
            assert time.monotonic() < deadline, "guest echo server never came up"
            await asyncio.sleep(0.2)

        async def send():
            for i in range(0, len(payload), 1 << 16):
                writer.write(payload[i : i + (1 << 16)])
                await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 120)
        await sender
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        writer.close()

        await agent.request(P.OP_SIGNAL, signum=signal.SIGINT)
        await asyncio.wait_for(agent.kernel_exited.wait(), 30)
        assert agent.kernel_exit_status == 7
        assert "got SIGINT" in agent.kernel_output_tail
        assert await vm.wait(timeout=30) == 0, "agent should power the VM off cleanly"
    finally:
        await agent.close()
        await vm.close()


async def test_two_vms_share_no_writable_state(qemu_backend, image):
    sha_before = image.manifest["files"]["root.ext4"]["sha256"]
    (vm1, a1), (vm2, a2) = await asyncio.gather(boot(qemu_backend), boot(qemu_backend))
    try:
        assert vm1.runtime_dir != vm2.runtime_dir
        status, out = await run_to_exit(
            vm1, a1, ["sh", "-c", "echo secret-1 > /root/marker && sync && cat /root/marker"]
        )
        assert status == 0 and "secret-1" in out
        status, out = await run_to_exit(
            vm2, a2, ["sh", "-c", "test -e /root/marker && echo PRESENT || echo ABSENT"]
        )
        assert status == 0 and "ABSENT" in out
        await vm1.wait(timeout=30)
        await vm2.wait(timeout=30)
    finally:
        for agent, vm in ((a1, vm1), (a2, vm2)):
            await agent.close()
            await vm.close()
    digest = hashlib.sha256()
    with open(image.root_disk, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    assert digest.hexdigest() == sha_before, "the shared root image must never change"


async def test_killed_vm_leaves_no_process_socket_or_dir(qemu_backend):
    before = runtime_entries()
    vm = await qemu_backend.start(VmSpec())
    rt = vm.runtime_dir
    assert rt.exists() and (rt / "mux.sock").exists()
    assert len(processes_mentioning(str(rt))) == 1, "one QEMU, no helper process"
    vm.kill()
    assert await vm.wait(timeout=10) == -signal.SIGKILL
    await vm.close()
    await vm.close()  # idempotent
    assert not rt.exists()
    assert processes_mentioning(str(rt)) == []
    assert runtime_entries() == before


def test_vm_dies_with_its_owner_process(image):
    """SIGKILL the process that started a VM: QEMU (and any helper) dies too, and the next
    reap removes the runtime dir."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from smol_kernel.vm.qemu import QemuBackend
        from smol_kernel.vm.spec import VmSpec
        async def main():
            vm = await QemuBackend().start(VmSpec())
            print(vm.runtime_dir, flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        rt = owner.stdout.readline().strip()
        assert rt, "owner did not start a VM"
        assert len(processes_mentioning(rt)) == 1  # QEMU (no helper process)
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
    deadline = time.monotonic() + 5
    while processes_mentioning(rt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(rt) == [], "VM outlived its owner"
    assert os.path.basename(rt) in reap_orphans()
    assert not os.path.exists(rt)


async def test_missing_image_is_a_clear_error_and_leaks_nothing(qemu_backend):
    before = runtime_entries()
    with pytest.raises(ImageNotFound, match="smol-kernel image build --name no-such-image"):
        await qemu_backend.start(VmSpec(image="no-such-image"))
    assert runtime_entries() == before


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("memory_mib", 64, "too small.*at least 256 MiB"),
        ("vcpus", 0, "from 1 to 64"),
        ("disk_mib", 1, "at least 64 MiB"),
    ],
)
async def test_bad_spec_is_a_clear_error_and_leaks_nothing(qemu_backend, field, value, message):
    before = runtime_entries()
    with pytest.raises(VmSpecError, match=message):
        await qemu_backend.start(VmSpec(**{field: value}))
    assert runtime_entries() == before


async def test_qemu_not_found_is_a_clear_error_and_leaks_nothing():
    before = runtime_entries()
    backend = QemuBackend(qemu="/nonexistent/qemu-system-x86_64")
    status = backend.check()
    assert not status.available
    assert "apt-get install qemu-system-x86" in status.fix
    with pytest.raises(BackendUnavailable, match="not installed"):
        await backend.start(VmSpec())
    assert runtime_entries() == before


async def test_a_selected_backend_does_not_check_again_for_each_vm(image, monkeypatch):
    """The check that chose the backend is the one its VMs get: a start does not repeat
    it (it used to run twice per cold start); a backend nobody checked checks once."""
    selection = select_backend("qemu", image.name)
    backend = selection.backend
    assert backend is not None, selection.error
    checks = []
    real_check = backend.check
    monkeypatch.setattr(backend, "check", lambda *a: checks.append(a) or real_check(*a))
    vm = await backend.start(VmSpec(image=image.name))
    try:
        assert vm.isolation == selection.status.isolation
    finally:
        await vm.close()
    assert checks == []
    fresh = QemuBackend()
    monkeypatch.setattr(fresh, "check", lambda *a: checks.append(a) or real_check(*a))
    for _ in range(2):
        vm = await fresh.start(VmSpec(image=image.name))
        await vm.close()
    assert checks == [(image.name,)]
    # A rebuilt image (another manifest) is checked again: its kernel may not boot as
    # the old one did, and it may lack what the backend needs.
    rebuilt = dataclasses.replace(image, manifest={**image.manifest, "created": "later"})
    assert (await fresh.status_for(rebuilt)).isolation == selection.status.isolation
    assert checks == [(image.name,)] * 2


async def test_a_vmm_that_dies_at_once_leaves_no_helper_dir_or_descriptor(image, tmp_path):
    """The start skeleton's failure path, after the share was opened and the network
    started: the VMM's own words, and nothing left behind."""
    backend = QemuBackend(qemu="/bin/false")
    backend.remember(image.name, QemuBackend().check(image.name))
    share = parse_share(f"{tmp_path}:/data")
    before, fds_before = runtime_entries(), set(os.listdir("/proc/self/fd"))
    helpers_before = set(child_pids())
    with pytest.raises(VmError, match="QEMU exited at once"):
        await backend.start(VmSpec(image=image.name, network=True, shares=(share,)))
    assert runtime_entries() == before
    assert set(child_pids()) <= helpers_before, "passt or its guard outlived the start"
    assert set(os.listdir("/proc/self/fd")) <= fds_before


def child_pids() -> list[int]:
    """Live child processes of this test process."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                out.append(int(d))
    return out


@pytest.mark.parametrize("balloon", [False, True], ids=["ram-file", "streamed"])
async def test_a_checkpoint_restores_with_the_devices_it_was_saved_with(
    qemu_backend, tmp_path, balloon
):
    """A VM without a balloon (a template's, a clone's) is saved as a RAM file its restores
    map; a cold-booted one, with its balloon, as a stream restored into fresh memory with
    the balloon back (a balloon's discards would punch holes into a mapped file). Both
    restores run: their agent answers, its clock going on from the save."""
    from smol_kernel.vm.qemu import Snapshot

    options = {} if balloon else {"template": tmp_path / "booted-ram"}
    vm = await qemu_backend.start(VmSpec(), **options)
    restored, agents = None, []
    try:
        agents.append(await GuestAgent.connect(vm, BOOT_TIMEOUT))
        assert vm.balloon is balloon
        await asyncio.sleep(3)  # the agent's clock then tells a restore from a new boot
        saved = Snapshot(tmp_path / "saved")
        saved.folder.mkdir()
        paused = await qemu_backend.checkpoint(vm, saved, 120)
        assert paused > 0 and saved.streamed is balloon
        if not balloon:
            assert saved.state.stat().st_size < 4 << 20, "the memory is in the RAM file"
        restored = await qemu_backend.start(VmSpec(), restore=saved)
        assert restored.balloon is balloon
        agents.append(await GuestAgent.connect(restored, 60))
        assert agents[-1].hello["ok"] is True
        assert agents[-1].hello["agent_seconds"] > agents[0].hello["agent_seconds"] + 2.5
    finally:
        for agent in agents:
            await agent.close()
        for v in (vm, restored):
            if v is not None:
                await v.close()


async def test_a_checkpoint_that_cannot_start_its_receiver_leaves_nothing(qemu_backend, tmp_path):
    """The QEMU that takes a checkpoint's memory exits at once (here: not QEMU at all): a
    clear error, no process, runtime folder or memory file left, and the VM runs on."""
    from smol_kernel.vm.qemu import Snapshot

    vm = await qemu_backend.start(VmSpec(), template=tmp_path / "booted-ram")
    agent = await GuestAgent.connect(vm, BOOT_TIMEOUT)
    try:
        before, fds = runtime_entries(), len(os.listdir("/proc/self/fd"))
        saved = Snapshot(tmp_path / "saved")
        saved.folder.mkdir()
        with pytest.raises(VmError, match="the QEMU that takes a checkpoint did not start"):
            await QemuBackend(qemu="/bin/false").checkpoint(vm, saved, 60)
        assert runtime_entries() == before
        assert len(os.listdir("/proc/self/fd")) == fds, "a descriptor (the memfd?) was kept"
        assert not saved.ram.exists()
        assert (await agent.request(P.OP_HELLO, timeout=10))["ok"] is True
    finally:
        await agent.close()
        await vm.close()
