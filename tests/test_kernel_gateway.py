"""Jupyter Kernel Gateway (3.x) serves smolvm kernels unchanged: REST start, execute over
its websocket, delete, and the VM is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import requests

from .conftest import install_spec, runtime_entries
from .web_helpers import free_port, wait_until_up, ws_execute

pytest.importorskip("kernel_gateway", reason="jupyter_kernel_gateway is not installed")
pytestmark = pytest.mark.vm


def test_kernel_gateway_runs_smolvm_kernels(jupyter_prefix, tmp_path):
    spec = install_spec(jupyter_prefix, "smolvm-gateway", "--memory-mib", "640")
    token, port = uuid.uuid4().hex, free_port()
    argv = [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={port}",
            f"--KernelGatewayApp.auth_token={token}"]  # fmt: skip
    with open(tmp_path / "gateway.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=log)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"token {token}"}
    before = runtime_entries()
    try:
        wait_until_up(lambda: requests.get(f"{base}/api/kernelspecs", headers=auth).ok, proc,
                      tmp_path / "gateway.log")  # fmt: skip
        assert requests.post(f"{base}/api/kernels", json={"name": spec}).status_code == 401
        r = requests.post(f"{base}/api/kernels", json={"name": spec}, headers=auth)
        assert r.status_code == 201, r.text
        kid = r.json()["id"]
        out = ws_execute(f"ws://127.0.0.1:{port}/api/kernels/{kid}/channels", token,
                         "import os\nprint(os.uname().release)")  # fmt: skip
        assert out.strip() and out.strip() != os.uname().release, "ran in the guest"
        assert len(runtime_entries() - before) == 1
        assert requests.delete(f"{base}/api/kernels/{kid}", headers=auth).status_code == 204
        assert runtime_entries() == before, "deleting the kernel must remove its VM"
    finally:
        proc.terminate()
        proc.wait(30)
