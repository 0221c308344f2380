"""The warm pool against real VMs: claims, misses, refills, recycling, and what must never
carry over from one kernel to the next."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smol_kernel.cli import main as cli_main
from smol_kernel.ioloop import on_io_loop
from smol_kernel.pool import warm_pool
from smol_kernel.vm.process import list_vms

from .conftest import close_warm_pool, install_spec, processes_mentioning
from .kernel_helpers import fill_pool, run_cell, start_kernel, stop_kernel, wait_pool

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parent.parent
BOOT_ID = "print(open('/proc/sys/kernel/random/boot_id').read().strip())"


@pytest.fixture(scope="module")
def pool_spec(jupyter_prefix) -> str:
    return install_spec(jupyter_prefix, "smolvm-pool", "--backend", "qemu",
                        "--pool-size", "1", "--memory-mib", "768")  # fmt: skip


@pytest.fixture(autouse=True)
def _empty_pool():
    """Each test starts and ends with no pool (no plans, no pooled VMs)."""
    close_warm_pool()
    yield
    close_warm_pool()


async def pool_call(fn):
    """Run ``fn(pool)`` on the io loop, where the pool lives."""

    async def call():
        return fn(warm_pool())

    return await on_io_loop(call())


async def boot_id(kc) -> str:
    r = await run_cell(kc, BOOT_ID)
    assert len(r.stdout.strip()) == 36, r
    return r.stdout.strip()


def shell_reply(ci: dict, key: bytes, timeout: float = 5.0) -> str | None:
    """Send kernel_info_request signed with ``key`` on a fresh shell connection; the reply's
    msg_type (its signature checked with ``key``), or None if none came."""
    import zmq
    from jupyter_client.session import Session

    session = Session(key=key, signature_scheme=ci["signature_scheme"])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"tcp://{ci['ip']}:{ci['shell_port']}")
        session.send(sock, "kernel_info_request", {})
        if not sock.poll(int(timeout * 1000)):
            return None
        _, msg = session.recv(sock)
        return msg["msg_type"] if msg else None
    finally:
        sock.close()


async def test_a_pooled_vm_serves_a_kernel_whose_key_it_never_saw(pool_spec, caplog):
    caplog.set_level(logging.INFO)
    await fill_pool(pool_spec)
    [pooled] = await pool_call(lambda p: p.ready_vms())
    state = pooled.rt.read_state()
    assert state["pooled"] is True and state["label"] == "", "ps must show it as pooled"
    assert state["pool_ready"] is True, "and as ready, not booting"

    km, kc = await start_kernel(pool_spec)
    try:
        prov = km.provisioner
        assert prov.start_kind == "pooled" and prov.vm is pooled
        assert f"claimed pooled VM {pooled.id}" in caplog.text
        state = pooled.rt.read_state()
        assert state["pooled"] is False and state["label"] == km.kernel_id

        ci = km.get_connection_info()
        key = ci["key"] if isinstance(ci["key"], bytes) else ci["key"].encode()
        r = await run_cell(kc, "import json, os\n"
                           "print(json.load(open('/run/smol-kernel/kernel.json'))['key'])\n"
                           "print(os.environ['KERNEL_ID'])")  # fmt: skip
        assert r.stdout.split() == [key.decode(), km.kernel_id]
        # Signed with the real key: answered (and the reply verifies with it) ...
        assert await asyncio.to_thread(shell_reply, ci, key) == "kernel_info_reply"
        # ... signed with any other key: ignored.
        assert await asyncio.to_thread(shell_reply, ci, b"not-" + key) is None
        r = await run_cell(kc, "print('still', 'fine')")
        assert r.stdout.strip() == "still fine"
    finally:
        await stop_kernel(km, kc)


async def test_restart_claims_another_vm_and_nothing_carries_over(pool_spec):
    await fill_pool(pool_spec)
    km, kc = await start_kernel(pool_spec)
    try:
        old_vm = km.provisioner.vm
        old_boot = await boot_id(kc)
        r = await run_cell(kc, "import os\nopen('/root/secret', 'w').write('x')\n"
                           "os.write(1, b'KERNEL-A-WAS-HERE\\n')\nx = 1")  # fmt: skip
        assert r.status == "ok"
        deadline = time.monotonic() + 10
        while "KERNEL-A-WAS-HERE" not in old_vm.console_tail(65536):
            assert time.monotonic() < deadline, "positive control: A's console has its line"
            await asyncio.sleep(0.2)
        # A refill replaces the claimed VM.
        await wait_pool(lambda p: p.ready_count(km.provisioner.plan) >= 1)
        [spare] = await pool_call(lambda p: p.ready_vms())

        await km.restart_kernel(now=False)
        await kc.wait_for_ready(timeout=120)
        new_vm = km.provisioner.vm
        assert km.provisioner.start_kind == "pooled" and new_vm is spare
        assert new_vm.id != old_vm.id and await boot_id(kc) != old_boot
        r = await run_cell(kc, "import os\nprint(os.path.exists('/root/secret'), 'x' in dir())")
        assert r.stdout.split() == ["False", "False"]
        assert "KERNEL-A-WAS-HERE" not in new_vm.console_tail(1 << 20)
        assert not old_vm.runtime_dir.exists()
        assert processes_mentioning(str(old_vm.runtime_dir)) == []
    finally:
        await stop_kernel(km, kc)


async def test_a_miss_builds_its_template_once_and_stops_a_refill(pool_spec, jupyter_prefix,
                                                                    caplog):  # fmt: skip
    """A start for a configuration with no pooled VM: the first one builds its template (a
    cold boot, during which no refill competes for the CPU), later ones restore clones."""
    caplog.set_level(logging.INFO)
    other_spec = install_spec(jupyter_prefix, "smolvm-pool-640", "--backend", "qemu",
                              "--pool-size", "0", "--memory-mib", "640")  # fmt: skip
    await fill_pool(pool_spec)
    km1, kc1 = await start_kernel(pool_spec)
    kernels = [(km1, kc1)]
    try:
        assert km1.provisioner.start_kind == "pooled"
        stopped = asyncio.ensure_future(wait_pool(lambda p: p.filling_vm is not None, 30))
        km2, kc2 = await start_kernel(other_spec)
        kernels.append((km2, kc2))
        assert km2.provisioner.start_kind == "clone"
        assert "building the template of" in caplog.text and "memory=640MiB" in caplog.text
        stopped.cancel()
        # Two kernels, two VMs: never one shared; each got its own memory_mib.
        assert km1.provisioner.vm.id != km2.provisioner.vm.id
        r = await run_cell(
            kc2, "import os\nprint(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 20)"
        )
        assert 500 < int(r.stdout) <= 640, "the kernel got its own memory_mib"
        # The next start of that configuration restores a clone: no second build.
        t0 = time.monotonic()
        km3, kc3 = await start_kernel(other_spec)
        kernels.append((km3, kc3))
        assert km3.provisioner.start_kind == "clone" and time.monotonic() - t0 < 10
        assert caplog.text.count("building the template of") == 1
        # The pool refilled after the build.
        await wait_pool(lambda p: p.ready_count(km1.provisioner.plan) >= 1)
    finally:
        for km, kc in kernels:
            await stop_kernel(km, kc)


async def test_pool_ttl_recycles_an_unused_vm(jupyter_prefix, caplog):
    caplog.set_level(logging.INFO)
    spec = install_spec(jupyter_prefix, "smolvm-pool-ttl", "--backend", "qemu",
                        "--pool-size", "1", "--pool-ttl", "5", "--memory-mib", "768")  # fmt: skip
    await fill_pool(spec)
    [first] = await pool_call(lambda p: p.ready_vms())
    await wait_pool(lambda p: p.ready_vms() and p.ready_vms()[0] is not first)
    assert f"recycling VM {first.id} (pool_ttl)" in caplog.text
    assert first.poll() is not None and not first.runtime_dir.exists()
    assert processes_mentioning(str(first.runtime_dir)) == []


async def test_pool_size_0_starts_no_vm_in_the_background(smolvm_spec, caplog):
    caplog.set_level(logging.INFO)
    refills = await pool_call(lambda p: p.refills)
    km, kc = await start_kernel(smolvm_spec)
    try:
        # A clone of the configuration's template (built by this start if it was the
        # first), and nothing in the background.
        assert km.provisioner.start_kind == "clone"
        assert "(pool_size is 0)" in caplog.text
        await asyncio.sleep(5)
        assert [st.get("label") for _, st in list_vms()] == [km.kernel_id]
        assert await pool_call(lambda p: (p.refills, p.filling, p.ready_count())) == (
            refills, None, 0)  # fmt: skip
    finally:
        await stop_kernel(km, kc)


SIGKILLED_OWNER = """
import asyncio, sys
sys.path.insert(0, {root!r})
from tests.kernel_helpers import fill_pool
from smol_kernel.ioloop import on_io_loop
from smol_kernel.pool import warm_pool

async def main():
    await fill_pool({spec!r})
    async def where():
        return str(warm_pool().ready_vms()[0].runtime_dir)
    print(await on_io_loop(where()), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_sigkill_of_the_owner_leaves_no_pooled_vm(pool_spec, capsys):
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGKILLED_OWNER.format(root=str(ROOT), spec=pool_spec)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        rt = proc.stdout.readline().strip()
        assert rt and Path(rt).is_dir() and processes_mentioning(rt), "the pool did not fill"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while processes_mentioning(rt) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(rt) == [], "a pooled VM outlived its owner"
    assert cli_main(["ps"]) == 0
    assert not Path(rt).exists(), "ps must remove the dead owner's pooled VM"
    assert os.path.basename(rt) in capsys.readouterr().err


def test_the_server_extension_fills_the_pool_at_server_start(tmp_path, image):
    """``smol-kernel install`` enables the extension; the server's first kernel is warm."""
    from .test_server import TOKEN, _api, _execute
    from .web_helpers import free_port

    prefix = tmp_path / "prefix"
    assert cli_main(["install", "--prefix", str(prefix), "--name", "smolvm-ext",
                     "--backend", "qemu", "--memory-mib", "768"]) == 0  # fmt: skip
    conf = prefix / "etc" / "jupyter" / "jupyter_server_config.d" / "smol_kernel.json"
    assert json.loads(conf.read_text()) == {
        "ServerApp": {"jpserver_extensions": {"smol_kernel": True}}}  # fmt: skip
    env = dict(os.environ, JUPYTER_PATH=str(prefix / "share" / "jupyter"),
               JUPYTER_CONFIG_PATH=str(prefix / "etc" / "jupyter"))  # fmt: skip
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}",
             "--KernelSpecManager.allowed_kernelspecs=smolvm-ext"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        pooled = []
        while not pooled:
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "no pooled VM: " + log_path.read_text()[-3000:]
            time.sleep(1)
            pooled = [rt for rt, st in list_vms()
                      if st.get("pooled") and st.get("owner_pid") == server.pid]  # fmt: skip
        # Booted is not prepared: wait for the pool's "ready" line before the first kernel.
        while "warm pool: VM" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        kernel = _api(base, "POST", "/api/kernels", {"name": "smolvm-ext"})
        out = _execute(f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels",
                       "print(6 * 7)")  # fmt: skip
        assert out.strip() == "42"
        assert f"claimed pooled VM {pooled[0].id}" in log_path.read_text()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    left = [rt for rt, st in list_vms() if st.get("owner_pid") == server.pid]
    assert left == [], "stopping the server must leave no VM, pooled or not"


async def test_a_pooled_vm_that_cannot_be_claimed_gives_way_to_another(pool_spec, caplog):
    """A prepared kernel takes a key once; if the claim fails (here: it was already
    claimed), the start restores another clone instead of failing, and the bad VM is gone."""
    from smol_kernel.guest import protocol as P

    caplog.set_level(logging.INFO)
    await fill_pool(pool_spec)
    [pooled] = await pool_call(lambda p: [v for vs in p._ready.values() for v in vs])
    await on_io_loop(pooled.agent.request(P.OP_CLAIM_KERNEL, connection={"key": "x"}, env={}))
    km, kc = await start_kernel(pool_spec)
    try:
        assert km.provisioner.start_kind == "clone"
        assert f"(the claimed VM {pooled.vm.id} failed" in caplog.text
        assert km.provisioner.vm is not pooled.vm and not pooled.vm.runtime_dir.exists()
        r = await run_cell(kc, "print(6 * 7)")
        assert r.stdout.strip() == "42"
    finally:
        await stop_kernel(km, kc)
