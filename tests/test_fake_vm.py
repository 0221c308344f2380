"""The host side of a kernel start without a VM (tests/fake_vm.py): planning, launch, the
relay, the control socket, quotas and metrics, in seconds. What the guest does is tested
against real VMs elsewhere; here the guest is a fake agent in front of a local ipykernel."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
from jupyter_client.manager import AsyncKernelManager

from smol_kernel import kernelspec, metrics, quota
from smol_kernel.kernel_control import ask

from .fake_vm import FakeVm, fake_backend, leftover_runtime_dirs
from .kernel_helpers import run_cell


@pytest.fixture
def fake_spec(tmp_path, monkeypatch):
    """Installs kernelspecs (``install(name, env=..., **config)``) the fake backend runs."""
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    backend = fake_backend(monkeypatch)

    def install(name: str, env: dict[str, str] | None = None, **config) -> str:
        spec = kernelspec.template()
        spec["display_name"] = f"Python ({name})"
        spec["env"] = env or {}
        spec["metadata"]["kernel_provisioner"]["config"] = {"pool_size": 0, **config}
        folder = tmp_path / "jupyter" / "kernels" / name
        folder.mkdir(parents=True)
        (folder / "kernel.json").write_text(json.dumps(spec))
        return name

    install.backend = backend  # type: ignore[attr-defined]
    return install


async def _start(name: str) -> tuple[AsyncKernelManager, object]:
    km = AsyncKernelManager(kernel_name=name)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=30)
    return km, kc


async def _stop(km: AsyncKernelManager, kc) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=True)


def _starts(kind: str) -> float:
    sample = metrics.prom.REGISTRY.get_sample_value("smol_kernel_vm_starts_total", {"kind": kind})
    return sample or 0.0


async def test_a_kernel_starts_plans_relays_and_leaves_nothing(fake_spec, monkeypatch):
    monkeypatch.setenv("SMOL_HOST_ONLY", "host-secret")
    name = fake_spec("fake-plain", env={"SPEC_VAR": "from-spec"})
    before = _starts("cold")
    km, kc = await _start(name)
    prov = km.provisioner
    try:
        assert (prov.start_kind, prov.backend_name, prov.isolation) == ("cold", "fake", "tcg")
        assert _starts("cold") == before + 1
        result = await run_cell(kc, "import os\n6 * 7")
        assert result.status == "ok" and result.data == [{"text/plain": "42"}]
        # What the host sent the guest: its hello, then the kernel's start with the plan's
        # environment -- the kernelspec's and the fixed variables, never the host's.
        vm = fake_spec.backend.vms[-1]
        ops = [r["op"] for r in vm.requests]
        assert ops[:2] == ["hello", "start_kernel"]
        env = vm.requests[1]["env"]
        assert env["SPEC_VAR"] == "from-spec" and env["KERNEL_ID"] == km.kernel_id
        assert env["SMOL_KERNEL_ISOLATION"] == "tcg" and env["SMOL_KERNEL_BACKEND"] == "fake"
        assert "SMOL_HOST_ONLY" not in env
        assert quota.ledger().kernels.get(id(prov.state)) == prov.plan.memory_mib
    finally:
        await _stop(km, kc)
    assert prov.vm is None and prov.relay is None
    assert id(prov.state) not in quota.ledger().kernels
    assert not leftover_runtime_dirs()


async def test_a_kernel_that_exits_before_it_is_ready_says_why(fake_spec):
    name = fake_spec("fake-exits", env={"FAKE_GUEST_EXIT": "3"})
    km = AsyncKernelManager(kernel_name=name)
    with pytest.raises(Exception, match=r"exited in the VM with status 3") as caught:
        await km.start_kernel()
    assert "boom" in str(caught.value)
    prov = km.provisioner
    assert prov.vm is None and prov.relay is None
    assert id(prov.state) not in quota.ledger().kernels
    assert not leftover_runtime_dirs()


async def test_a_quota_refuses_a_kernel_before_its_vm_starts(fake_spec):
    name = fake_spec("fake-quota", max_vms=1)
    km, kc = await _start(name)
    try:
        started = len(fake_spec.backend.vms)
        second = AsyncKernelManager(kernel_name=name)
        with pytest.raises(Exception, match=r"max_vms") as caught:
            await second.start_kernel()
        assert getattr(caught.value, "status_code", None) == 403
        assert len(fake_spec.backend.vms) == started, "the refused kernel started a VM"
        assert (await run_cell(kc, "1 + 1")).data == [{"text/plain": "2"}], "unharmed"
    finally:
        await _stop(km, kc)


async def test_the_control_socket_lists_and_refuses_what_the_backend_cannot(fake_spec):
    km, kc = await _start(fake_spec("fake-control"))
    try:
        folder = km.provisioner.vm.runtime_dir
        listed = await asyncio.to_thread(ask, folder, {"op": "list"}, 10)
        assert listed == {"ok": True, "checkpoints": []}
        refused = await asyncio.to_thread(ask, folder, {"op": "checkpoint"}, 10)
        assert not refused["ok"] and "fake backend cannot save a VM" in refused["error"]
        unknown = await asyncio.to_thread(ask, folder, {"op": "format-disk"}, 10)
        assert not unknown["ok"] and "unknown op" in unknown["error"]
    finally:
        await _stop(km, kc)


async def test_an_interrupt_reaches_the_guest_as_a_signal(fake_spec):
    km, kc = await _start(fake_spec("fake-interrupt"))
    try:
        msg_id = kc.execute("import time\ntime.sleep(30)")
        await asyncio.sleep(1)
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=20)
        while reply["parent_header"].get("msg_id") != msg_id:  # a kernel_info left over
            reply = await kc.get_shell_msg(timeout=20)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        vm = km.provisioner.vm
        signals = [r["signum"] for r in vm.requests if r["op"] == "signal"]
        assert signals == [signal.SIGINT]
    finally:
        await _stop(km, kc)


async def test_the_launcher_reports_the_isolation_the_vm_got(fake_spec, monkeypatch):
    """A VM whose isolation is not the one the backend check found is refused: the plan
    says tcg, this VM claims kvm."""
    from smol_kernel.vm.spec import Isolation

    real_init = FakeVm.__init__

    def lying_init(self, spec):
        real_init(self, spec)
        self.isolation = Isolation.KVM

    monkeypatch.setattr(FakeVm, "__init__", lying_init)
    km = AsyncKernelManager(kernel_name=fake_spec("fake-lies"))
    with pytest.raises(Exception, match=r"got isolation kvm, not the tcg"):
        await km.start_kernel()
    assert km.provisioner.vm is None and not leftover_runtime_dirs()
