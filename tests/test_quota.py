"""Quotas per server process, the audit log, ps's user column and ``smol-kernel logs``."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import subprocess
import sys

import pytest
from jupyter_client.manager import AsyncKernelManager
from prometheus_client import REGISTRY
from tornado.web import HTTPError

from smol_kernel.provisioner import SmolVMProvisioner

from .conftest import close_warm_pool, install_spec, runtime_entries
from .kernel_helpers import fill_pool, run_cell, start_kernel, stop_kernel, wait_pool

pytestmark = pytest.mark.vm


def refusals() -> float:
    return REGISTRY.get_sample_value("smol_kernel_quota_refusals_total") or 0.0


def audit_lines(caplog) -> list[dict]:
    prefix = "smol-kernel audit: "
    return [json.loads(r.getMessage()[len(prefix) :]) for r in caplog.records
            if r.getMessage().startswith(prefix)]  # fmt: skip


def test_memory_cap_defaults_to_the_spawners_mem_limit(monkeypatch):
    monkeypatch.setenv("MEM_LIMIT", str(3 * 1024**3))
    assert SmolVMProvisioner().max_total_memory_mib == 3072
    monkeypatch.delenv("MEM_LIMIT")
    assert SmolVMProvisioner().max_total_memory_mib == 0


async def test_caps_refuse_with_403_audit_and_logs(jupyter_prefix, caplog):
    caplog.set_level(logging.INFO)
    spec = install_spec(jupyter_prefix, "smolvm-quota", "--max-vms", "1", "--memory-mib", "768")
    big = install_spec(jupyter_prefix, "smolvm-quota-mem", "--max-total-memory-mib", "1200",
                       "--memory-mib", "768")  # fmt: skip
    km, kc = await start_kernel(spec)
    try:
        r = await run_cell(kc, "open('/dev/console', 'w').write("
                           "'\\x1b]0;title\\x07\\x1b[31mconsole-marker\\n')")  # fmt: skip
        assert r.status == "ok"
        before, entries = refusals(), runtime_entries()
        for name, setting in ((spec, "max_vms"), (big, "max_total_memory_mib")):
            km2 = AsyncKernelManager(kernel_name=name)
            with pytest.raises(HTTPError) as err:
                await km2.start_kernel()
            assert err.value.status_code == 403
            assert setting in err.value.log_message and str(err.value).startswith("cannot start")
            assert not km2.has_kernel
        assert runtime_entries() == entries, "a refused start leaves nothing behind"
        assert refusals() == before + 2

        ps = subprocess.run([sys.executable, "-m", "smol_kernel.cli", "ps", "--json"],
                            capture_output=True, text=True, check=True)  # fmt: skip
        (row,) = [r for r in json.loads(ps.stdout) if r["kernel_id"] == km.kernel_id]
        assert row["user"] == (os.environ.get("JUPYTERHUB_USER") or getpass.getuser())
        logs = subprocess.run([sys.executable, "-m", "smol_kernel.cli", "logs", km.kernel_id],
                              capture_output=True, text=True, check=True)  # fmt: skip
        assert "smol-agent: ready" in logs.stdout and "console-marker" in logs.stdout
        assert "\x1b" not in logs.stdout and "\x07" not in logs.stdout, "escapes must not pass"
        vm_id = km.provisioner.vm.id
    finally:
        await stop_kernel(km, kc)
    start, end = [a for a in audit_lines(caplog) if a["kernel_id"] == km.kernel_id]
    assert start["event"] == "kernel_start" and start["vm_id"] == vm_id
    assert start["memory_mib"] == 768 and start["isolation"] in ("kvm", "tcg")
    assert start["start"] == "clone" and start["network"] is False and start["shares"] == []
    assert end["event"] == "kernel_end" and end["reason"] == "shutdown"
    assert end["lifetime_s"] > 0 and end["user"] == start["user"]


async def test_the_pool_gives_way_to_a_kernel(jupyter_prefix):
    """max_vms counts pooled VMs, and a kernel start closes them before it is refused;
    refills wait while the cap is reached."""
    from smol_kernel.ioloop import on_io_loop
    from smol_kernel.pool import warm_pool

    pooled = install_spec(jupyter_prefix, "smolvm-quota-pool", "--max-vms", "2",
                          "--memory-mib", "768", "--pool-size", "1")  # fmt: skip
    other = install_spec(jupyter_prefix, "smolvm-quota-other", "--max-vms", "2",
                         "--memory-mib", "640")  # fmt: skip
    try:
        await fill_pool(pooled)
        km_a, kc_a = await start_kernel(pooled)  # claims it; a refill boots: 2 VMs
        await wait_pool(lambda p: len(p.memory()) == 1, timeout=60)
        km_b, kc_b = await start_kernel(other)  # the refill (or its VM) gives way
        try:
            assert km_b.provisioner.start_kind == "clone"  # (its template is built first)

            async def pool_vms() -> int:
                return len(warm_pool().memory())

            assert await on_io_loop(pool_vms()) == 0, "no refill while the cap is reached"
        finally:
            await stop_kernel(km_b, kc_b)
        await wait_pool(lambda p: len(p.memory()) == 1, timeout=60)  # room again: refill
        await stop_kernel(km_a, kc_a)
    finally:
        close_warm_pool()


def server_config(**settings) -> object:
    """Settings as a Jupyter config file (or the server's command line) gives them."""
    from traitlets.config import Config

    config = Config()
    for name, value in settings.items():
        setattr(config.SmolVMProvisioner, name, value)
    return config


async def test_the_servers_caps_hold_whatever_a_kernelspec_says(jupyter_prefix):
    """A kernelspec without max_vms (or with a larger one) used to have no cap, as the last
    start's settings were the process's. The server's own setting now holds for all."""
    loose = install_spec(jupyter_prefix, "smolvm-quota-loose", "--memory-mib", "640")
    looser = install_spec(jupyter_prefix, "smolvm-quota-looser", "--max-vms", "5",
                          "--memory-mib", "640")  # fmt: skip
    config = server_config(max_vms=1)
    km, kc = await start_kernel(loose, config=config)
    try:
        entries = runtime_entries()
        for name in (loose, looser):
            km2 = AsyncKernelManager(kernel_name=name, config=config)
            with pytest.raises(HTTPError) as err:
                await km2.start_kernel()
            assert err.value.status_code == 403 and "max_vms" in err.value.log_message
        assert runtime_entries() == entries
    finally:
        await stop_kernel(km, kc)


async def test_a_warm_up_respects_the_servers_caps_before_any_kernel(jupyter_prefix):
    """The server extension fills the pool when the server starts: with max_vms reached by
    a running kernel, it boots nothing (it used to, before any start had set limits)."""
    from jupyter_client.kernelspec import KernelSpecManager

    from smol_kernel.ioloop import on_io_loop
    from smol_kernel.pool import warm_pool
    from smol_kernel.server_extension import warm_kernelspec

    spec = install_spec(jupyter_prefix, "smolvm-quota-warm", "--memory-mib", "640",
                        "--pool-size", "1")  # fmt: skip
    config = server_config(max_vms=1, pool_size=0)
    km, kc = await start_kernel(spec, config=config)  # the one VM the server may run
    try:
        close_warm_pool()
        parent = AsyncKernelManager(kernel_name=spec, config=server_config(max_vms=1))
        said = await warm_kernelspec(KernelSpecManager().get_kernel_spec(spec), parent=parent)
        assert said.startswith("keeping 1 VM"), said
        await asyncio.sleep(3)

        async def pooled() -> int:
            return len(warm_pool().memory())

        assert await on_io_loop(pooled()) == 0, "a refill booted past the server's max_vms"
    finally:
        close_warm_pool()
        await stop_kernel(km, kc)


def test_the_pool_forgets_configurations_nobody_starts(monkeypatch):
    """With share_cwd every notebook folder is a configuration: the pool keeps at most
    MAX_PLANS of them, and none that was not started for a day."""
    import smol_kernel.pool as pool_mod
    from smol_kernel.kernel_vm import KernelPlan

    pool = pool_mod.WarmPool()
    pool.admit = lambda plan: "no room (this test boots nothing)"

    def plan(i: int) -> KernelPlan:
        return KernelPlan("qemu", "default", 1, 512, 1024, False, (), (), ("python3",),
                          (), f"/work{i}", 0, False)  # fmt: skip

    async def run() -> None:
        for i in range(pool_mod.MAX_PLANS + 3):
            pool.want(plan(i), backend=None, size=1, ttl=60, boot_timeout=60)  # type: ignore[arg-type]
        await pool._tend()
        assert set(pool._wants) == {plan(i) for i in range(3, pool_mod.MAX_PLANS + 3)}
        pool._wants[plan(3)].asked -= pool_mod.PLAN_IDLE_SECONDS + 1
        await pool._tend()
        assert plan(3) not in pool._wants and len(pool._wants) == pool_mod.MAX_PLANS - 1
        await pool.close()

    asyncio.run(run())
