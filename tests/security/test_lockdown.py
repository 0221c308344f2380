"""A real ``jupyter server`` configured by ``smol-kernel install --lockdown``: every way of
starting a kernel by a name that is not allowed is refused before any host process starts,
terminals are off, a smolvm kernel still runs, and a guest flooding 60 MiB output messages
cannot grow the server's memory past the output caps (a browser that does not read, then
one that went away)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import websocket

from ..conftest import processes_mentioning
from ..kernel_helpers import rss_mib
from ..web_helpers import (
    free_port,
    wait_until_up,
    ws_execute,
    ws_v1_connect,
    ws_v1_decode,
    ws_v1_execute_request,
)

pytestmark = pytest.mark.vm
TOKEN = "lockdown-test-token"
FLOOD_SECONDS = 60
# Every byte a 60 MiB-message flood could pile up in the server is capped, and each stage
# holds at most one message in a few forms: the relay's backlog (iopub_backlog_mib, 256);
# the relay's strict parse of one message (its frame and its parsed text, 2 x 64); the
# server's zmq socket (one queued message and one being received, 2 x 64); jupyter_server
# with one in hand (the message, its JSON, the websocket frame: 3 x 64); the server
# extension's websocket / offline buffer caps (32). Measured: +551 to +690 MiB; a flood
# nothing capped grows by gigabytes in the same 60 s.
SERVER_GROWTH_MIB = 256 + 2 * 64 + 2 * 64 + 3 * 64 + 32


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory, image):
    from smol_kernel.cli import main as cli

    tmp = tmp_path_factory.mktemp("locked")
    prefix = tmp / "prefix"
    assert cli(["install", "--prefix", str(prefix), "--lockdown", "--pool-size", "0",
                "--memory-mib", "768"]) == 0  # fmt: skip
    assert cli(["install", "--prefix", str(prefix), "--lockdown", "--pool-size", "0",
                "--memory-mib", "768"]) == 0, "--lockdown again changes nothing"  # fmt: skip
    # Kernelspecs that would run on the host, installed where the server finds them: one the
    # admin allowed by mistake (it names no smolvm provisioner), and a copy of "smolvm" that
    # another user owns in a folder Jupyter searches first (the user's own data folder is
    # never searched: tests/test_lockdown_specs.py).
    shadow = tmp / "shadow"
    for folder in (prefix / "share" / "jupyter" / "kernels" / "hostpy",
                   shadow / "kernels" / "smolvm"):  # fmt: skip
        folder.mkdir(parents=True)
        (folder / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "host python", "language": "python"}))  # fmt: skip
    for path in (shadow, *shadow.rglob("*")):
        os.chown(path, 4242, 4242)
    conf_file = prefix / "etc" / "jupyter" / "jupyter_server_config.json"
    conf = json.loads(conf_file.read_text())
    conf["KernelSpecManager"]["allowed_kernelspecs"].append("hostpy")
    conf_file.write_text(json.dumps(conf))
    runtime = tmp / "jupyter-runtime"
    port = free_port()
    env = {**os.environ, "JUPYTER_PATH": f"{shadow}:{prefix}/share/jupyter",
           "JUPYTER_CONFIG_PATH": f"{prefix}/etc/jupyter",
           "JUPYTER_RUNTIME_DIR": str(runtime)}  # fmt: skip
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    api = requests.Session()
    api.headers["Authorization"] = f"token {TOKEN}"
    wait_until_up(lambda: api.get(f"{base}/api/status").ok, server, tmp / "server.log")
    try:
        yield base, api, server, runtime, tmp
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def host_kernels(runtime: Path) -> list[int]:
    """Host kernel processes this server started (their connection file is in its runtime
    folder; a smolvm kernel has no process of its own there)."""
    return [p for p in processes_mentioning(str(runtime)) if "ipykernel" in
            Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]  # fmt: skip


def test_lockdown_refuses_every_name_but_the_smolvm_kernelspec(locked_server):
    """Nothing starts on the host: not a name outside the allow-list, not an allowed name
    whose kernelspec names no smolvm provisioner, not the user's own copy of "smolvm"
    (issue 30: it shadowed the admin's and ran on the host; now it is skipped and the
    admin's runs). Before any process starts, with a 403 that says why."""
    base, api, _, runtime, tmp = locked_server
    conf = json.loads((tmp / "prefix" / "etc" / "jupyter" / "jupyter_server_config.json")
                      .read_text())  # fmt: skip
    assert conf["ServerApp"]["terminals_enabled"] is False
    assert conf["LabApp"]["extension_manager"] == "readonly"
    assert conf["ServerApp"]["kernel_manager_class"] == "smol_kernel.lockdown.RoutingKernelManager"
    assert conf["RoutingKernelManager"]["kernel_aliases"] == {"python3": "smolvm"}
    off = conf["ServerApp"]["jpserver_extensions"]
    assert off["notebook_intelligence"] is off["jupyter_ai_jupyternaut"] is False
    assert set(api.get(f"{base}/api/kernelspecs").json()["kernelspecs"]) == {"smolvm"}
    for name in ("mine", "hostpy", "../kernels/hostpy", "smolvm/../hostpy"):
        r = api.post(f"{base}/api/kernels", json={"name": name})
        assert r.status_code == 403, (name, r.status_code, r.text)
        assert "not allowed" in r.json()["message"] or "provisioner" in r.json()["message"]
    assert "does not name the smolvm provisioner" in api.post(
        f"{base}/api/kernels", json={"name": "hostpy"}).json()["message"]  # fmt: skip
    assert api.post(f"{base}/api/terminals").status_code == 404, "terminals are off"
    time.sleep(2)  # a host kernel, had one started, would be running by now
    assert api.get(f"{base}/api/kernels").json() == []
    assert host_kernels(runtime) == []
    # The other user's copy of "smolvm" is what Jupyter would pick (the control: the
    # server's own search path, a plain KernelSpecManager), yet the admin's runs.
    code = ("from jupyter_client.kernelspec import KernelSpecManager as K; "
            "print(K().find_kernel_specs()['smolvm'])")  # fmt: skip
    env = {**os.environ, "JUPYTER_PATH": f"{tmp}/shadow:{tmp}/prefix/share/jupyter"}
    picked = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    assert picked == str(tmp / "shadow" / "kernels" / "smolvm")
    r = api.post(f"{base}/api/kernels", json={"name": "smolvm"})
    assert r.status_code == 201, r.text
    try:
        assert host_kernels(runtime) == []
        assert "skipping kernelspec folder" in (tmp / "server.log").read_text()
        assert "belongs to uid 4242" in (tmp / "server.log").read_text()
    finally:
        api.delete(f"{base}/api/kernels/{r.json()['id']}")


def test_python3_is_routed_to_the_smolvm_kernelspec(locked_server):
    """Issue 36: a client that asks for python3 (jupyter-kernel-client, and the assistants
    built on it) gets a smolvm kernel instead of a 403: its name is the kernelspec that ran,
    the audit line names both. So does a session, and the default kernel."""
    base, api, _, runtime, tmp = locked_server
    started, session = [], ""
    try:
        for body in ({"name": "python3"}, {"name": "Python3"}, {}):
            r = api.post(f"{base}/api/kernels", json=body)
            assert r.status_code == 201, (body, r.text)
            started.append(r.json()["id"])
            assert r.json()["name"] == "smolvm", r.json()
        (tmp / "nb.ipynb").write_text("{}")
        r = api.post(f"{base}/api/sessions", json={"path": "nb.ipynb", "type": "notebook",
                                                   "kernel": {"name": "python3"}})  # fmt: skip
        assert r.status_code == 201, r.text
        session = r.json()["id"]
        started.append(r.json()["kernel"]["id"])
        assert r.json()["kernel"]["name"] == "smolvm"
        ws_url = f"ws://{base.split('//', 1)[1]}/api/kernels/{started[0]}/channels"
        out = ws_execute(ws_url, TOKEN, "import os; print(os.environ['SMOL_KERNEL_ISOLATION'])")
        assert out.strip() in ("kvm", "tcg", "hvf")
        assert host_kernels(runtime) == []
        log = (tmp / "server.log").read_text()
        assert "'python3' was asked for; starting kernelspec 'smolvm' instead" in log
        assert '"kernelspec": "smolvm", "requested": "python3"' in log
    finally:
        for kernel_id in started:
            api.delete(f"{base}/api/kernels/{kernel_id}")
        if session:
            api.delete(f"{base}/api/sessions/{session}")


FLOOD = f"""
import threading, time
k = get_ipython().kernel
parent = k.get_parent()
def flood():
    blob = "x" * (60 << 20)
    t0 = time.time()
    while time.time() - t0 < {FLOOD_SECONDS}:
        k.session.send(k.iopub_socket, "stream", {{"name": "stdout", "text": blob}},
                       parent=parent)
threading.Thread(target=flood, daemon=True).start()
print("flooding")
"""


def test_a_smolvm_kernel_runs_and_its_flood_stays_within_the_caps(locked_server):
    base, api, server, runtime, _ = locked_server
    r = api.post(f"{base}/api/kernels", json={"name": "smolvm"})
    assert r.status_code == 201, r.text
    kernel_id = r.json()["id"]
    ws_url = f"ws://{base.split('//', 1)[1]}/api/kernels/{kernel_id}/channels"
    try:
        out = ws_execute(ws_url, TOKEN, "import os; print(os.environ['SMOL_KERNEL_ISOLATION'])")
        assert out.strip() in ("kvm", "tcg", "hvf")
        assert host_kernels(runtime) == []

        before = rss_mib(server.pid)
        peak = before
        # JupyterLab's protocol (no server-side rate limit): a browser that does not read
        # for half the flood, then goes away.
        session = "flood-session"
        ws = ws_v1_connect(f"{ws_url}?session_id={session}", TOKEN)
        ws.send_binary(ws_v1_execute_request(FLOOD, session))
        t0 = time.monotonic()
        while time.monotonic() - t0 < FLOOD_SECONDS / 2:
            peak = max(peak, rss_mib(server.pid))
            time.sleep(1)
        ws.close()
        while time.monotonic() - t0 < FLOOD_SECONDS + 10:
            peak = max(peak, rss_mib(server.pid))
            time.sleep(1)
        grew = peak - before
        print(f"server RSS: {before:.0f} MiB before, peak {peak:.0f} MiB (+{grew:.0f})")
        assert grew < SERVER_GROWTH_MIB, f"the server grew {grew:.0f} MiB during the flood"

        # The kernel still answers, and the browser that comes back is told output was
        # dropped: by the relay, or first by jupyter_server's own rate limiter (1 MB/s of
        # stream output by default), which drops output and says so before our line can.
        seen = ""
        ws = ws_v1_connect(f"{ws_url}?session_id={session}", TOKEN, timeout=10)
        deadline = time.monotonic() + 120
        while not seen and time.monotonic() < deadline:
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(raw, bytes):
                _, msg = ws_v1_decode(raw)
                text = str(msg.get("content", {}).get("text", ""))
                if msg["msg_type"] == "stream" and ("smol-kernel" in text or "rate" in text):
                    seen = text
        ws.close()
        ours = "dropped" in seen and "iopub_backlog_mib" in seen
        assert ours or "IOPub data rate exceeded" in seen, seen
        assert ws_execute(ws_url, TOKEN, "print(6 * 7)").strip() == "42"
    finally:
        api.delete(f"{base}/api/kernels/{kernel_id}")


NOTEBOOK = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "hello"}],
            "metadata": {}, "nbformat": 4, "nbformat_minor": 5}  # fmt: skip


def test_an_export_runs_no_template_a_page_wrote_into_the_servers_folder(locked_server):
    """Review of issue 36: nbconvert looks for templates in the server's working folder
    first, which the contents API writes; a template is Jinja run on the host (not
    sandboxed). A page (or an assistant) PUT lab/index.html.j2 and exported a notebook:
    code on the host, lock-down or not. Control: nbconvert with its defaults, started in
    the same folder, runs the planted template."""
    base, api, _, _, tmp = locked_server
    marker = tmp / "template-ran"
    template = ("{%- extends 'base.html.j2' -%}{%- block body -%}"
                "{{ lipsum.__globals__['os'].system('touch " + str(marker) + "') }}"
                "{%- endblock body -%}")  # fmt: skip
    assert api.put(f"{base}/api/contents/lab", json={"type": "directory"}).ok
    put = api.put(f"{base}/api/contents/lab/index.html.j2",
                  json={"type": "file", "format": "text", "content": template})  # fmt: skip
    assert put.ok, put.text
    assert api.put(f"{base}/api/contents/export.ipynb",
                   json={"type": "notebook", "content": NOTEBOOK}).ok  # fmt: skip
    exported = api.get(f"{base}/nbconvert/html/export.ipynb?download=false")
    assert exported.status_code == 200 and "hello" in exported.text, exported.text[:300]
    assert not marker.exists(), "the template a page wrote ran on the host"
    control = subprocess.run(
        [sys.executable, "-c", "from nbconvert import HTMLExporter; "
         "HTMLExporter().from_filename('export.ipynb')"],
        cwd=tmp, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert marker.exists(), ("the probe: nbconvert's defaults run it", control.stderr[-500:])
    marker.unlink()


def test_a_locked_down_server_names_assistant_extensions_that_run_on_the_host():
    """Where an admin turns one back on, the server extension logs it as an error at start
    (what it runs on the host, and the command to turn it off); nothing when none is on."""
    from types import SimpleNamespace

    from smol_kernel.lockdown import host_executing_extensions

    app = SimpleNamespace(jpserver_extensions={"notebook_intelligence": True,
                                               "jupyter_ai_jupyternaut": False,
                                               "smol_kernel": True})  # fmt: skip
    found = host_executing_extensions(app)
    assert len(found) == 1 and found[0].startswith("notebook_intelligence: ")
    assert "Claude Code" in found[0]
    assert host_executing_extensions(SimpleNamespace(jpserver_extensions={})) == []
