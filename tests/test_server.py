"""A real headless ``jupyter server``: REST + websocket like JupyterLab, then SIGKILL it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from smol_kernel.cli import main as cli_main
from smol_kernel.vm.process import list_vms

from .conftest import processes_mentioning
from .web_helpers import free_port, wait_until_up, ws_execute

pytestmark = pytest.mark.vm
TOKEN = "smol-test-token"


def _api(base: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"{base}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        data = resp.read()
    return json.loads(data) if data else {}


def _execute(ws_url: str, code: str, timeout: float = 60) -> str:
    return ws_execute(ws_url, TOKEN, code, timeout)


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_server_session_executes_then_stopping_the_server_leaves_no_vm(
    smolvm_spec, jupyter_prefix, tmp_path, stop, capsys
):
    port = free_port()
    env = dict(os.environ)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(lambda: bool(_api(base, "GET", "/api/kernelspecs")), server,
                      tmp_path / "server.log")  # fmt: skip
        specs = _api(base, "GET", "/api/kernelspecs")
        assert smolvm_spec in specs["kernelspecs"], "the smolvm kernelspec must be listed"
        (tmp_path / "nb.ipynb").write_text("{}")
        session = _api(base, "POST", "/api/sessions", {
            "path": "nb.ipynb", "type": "notebook", "kernel": {"name": smolvm_spec}})  # fmt: skip
        kernel_id = session["kernel"]["id"]
        ws_url = f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels"
        out = _execute(ws_url, "import os; print(os.environ['SMOL_KERNEL_ISOLATION'], 6 * 7)")
        isolation, answer = out.split()
        assert answer == "42" and isolation in ("kvm", "tcg", "hvf")

        mine = [(rt, st) for rt, st in list_vms() if st.get("label") == kernel_id]
        assert len(mine) == 1, "smol-kernel ps must show the kernel's VM under its kernel id"
        rt = mine[0][0].path
        assert len(processes_mentioning(str(rt))) == 1  # QEMU alone

        server.send_signal(getattr(signal, stop))
        if stop == "SIGINT":  # Ctrl-C: the server asks to confirm; a second one stops it
            time.sleep(1)
            server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
        deadline = time.monotonic() + 5
        while processes_mentioning(str(rt)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_mentioning(str(rt)) == [], f"the VM outlived the server ({stop})"
        if stop == "SIGKILL":
            # Nothing of ours ran: the folder is left for the next ps, kill or start.
            capsys.readouterr()
            assert cli_main(["ps"]) == 0
            assert rt.name in capsys.readouterr().err, "ps removes and names the leftover"
        assert not rt.exists(), f"the VM's runtime dir outlived the server ({stop})"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
