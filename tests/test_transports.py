"""ipc transport through the relay, and provisioner info for a restarted server."""

from __future__ import annotations

import os

import pytest
from jupyter_client.manager import AsyncKernelManager

from smol_kernel.provisioner import SmolVMProvisioner

from .conftest import processes_mentioning
from .kernel_helpers import run_cell, stop_kernel

pytestmark = pytest.mark.vm


async def test_ipc_transport_and_provisioner_info_culls_the_vm(smolvm_spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ipc socket files are made relative to the working dir
    km = AsyncKernelManager(kernel_name=smolvm_spec, transport="ipc", ip=str(tmp_path / "k"))
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        ci = km.get_connection_info()
        assert ci["transport"] == "ipc"
        sock = tmp_path / f"k-{ci['shell_port']}"
        assert sock.exists() and oct(sock.stat().st_mode & 0o777) == "0o600"
        r = await run_cell(kc, "print(6 * 7)")
        assert r.stdout.strip() == "42"

        # A restarted server only has the persisted info: it must find and cull the VM.
        info = await km.provisioner.get_provisioner_info()
        rt = km.provisioner.vm.runtime_dir
        assert info["runtime_dir"] == str(rt) and info["vmm_pid"] == km.provisioner.vm.pid
        other = SmolVMProvisioner(kernel_id=km.kernel_id, kernel_spec=km.kernel_spec)
        await other.load_provisioner_info(info)
        assert other.has_process and await other.poll() is None
        await other.kill()
        assert processes_mentioning(str(rt)) == [] and not rt.exists()
        assert await other.poll() == 0
    finally:
        await stop_kernel(km, kc)
    assert not any(p.name.startswith("k-") for p in tmp_path.iterdir()), "ipc sockets left"
    assert os.getcwd() == str(tmp_path)
