"""Jupyter Kernel Gateway (3.x) serves smolvm kernels unchanged: REST start, execute over
its websocket, delete, and the VM is gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import requests
import websocket

from .conftest import install_spec, runtime_entries

pytest.importorskip("kernel_gateway", reason="jupyter_kernel_gateway is not installed")
pytestmark = pytest.mark.vm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/api/kernelspecs", headers=auth).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "gateway.log"
            ).read_text()[-2000:]
            time.sleep(0.5)
        assert requests.post(f"{base}/api/kernels", json={"name": spec}).status_code == 401
        r = requests.post(f"{base}/api/kernels", json={"name": spec}, headers=auth)
        assert r.status_code == 201, r.text
        kid = r.json()["id"]
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/api/kernels/{kid}/channels",
            header=[f"Authorization: token {token}"], timeout=120,
        )  # fmt: skip
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t",
                       "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": "import os\nprint(os.uname().release)", "silent": False,
                        "store_history": True, "user_expressions": {}, "allow_stdin": False},
        }))  # fmt: skip
        out = ""
        while True:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        ws.close()
        assert out.strip() and out.strip() != os.uname().release, "ran in the guest"
        assert len(runtime_entries() - before) == 1
        assert requests.delete(f"{base}/api/kernels/{kid}", headers=auth).status_code == 204
        assert runtime_entries() == before, "deleting the kernel must remove its VM"
    finally:
        proc.terminate()
        proc.wait(30)
