"""smolvm kernels under a real JupyterHub (configurable-http-proxy from npm,
DummyAuthenticator, SimpleLocalProcessSpawner), all on 127.0.0.1: lock-down, quotas,
culling, identity, and nothing left when the user's server stops."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from smol_kernel.paths import cache_dir

from .conftest import processes_mentioning, runtime_entries
from .web_helpers import free_port, wait_until_up, ws_execute, ws_send_execute

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        shutil.which("configurable-http-proxy") is None,
        reason="configurable-http-proxy (npm) is not installed; scripts/setup.sh installs it",
    ),
]
TOKEN = uuid.uuid4().hex


@pytest.fixture
def hub(tmp_path, image):
    from smol_kernel.cli import main as cli

    prefix = tmp_path / "prefix"
    flags = ["--max-vms", "2", "--pool-size", "0", "--memory-mib", "640"]
    assert cli(["install", "--prefix", str(prefix), "--lockdown", "--no-server-extension",
                *flags]) == 0  # fmt: skip
    conf = prefix / "etc" / "jupyter" / "jupyter_server_config.json"
    config = json.loads(conf.read_text())  # the lock-down, plus culling:
    config["MappingKernelManager"] = {"cull_idle_timeout": 10, "cull_interval": 2,
                                      "cull_busy": False, "cull_connected": True}  # fmt: skip
    conf.write_text(json.dumps(config))
    # alice's own kernelspec, which would run on the host: lock-down must hide it
    own = tmp_path / "home" / "alice" / ".local" / "share" / "jupyter" / "kernels" / "mine"
    own.mkdir(parents=True)
    (own / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "alice's host python", "language": "python"}))  # fmt: skip
    port, hub_port, api_port = free_port(), free_port(), free_port()
    args = ["--allow-root"] if os.getuid() == 0 else []
    (tmp_path / "jupyterhub_config.py").write_text(f"""
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
c.JupyterHub.db_url = "sqlite:///{tmp_path}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{tmp_path}/cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {{"alice"}}
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "{tmp_path}/home/{{username}}"
c.Spawner.cmd = [{sys.executable!r}, "-m", "jupyterhub.singleuser"]
c.Spawner.args = {args!r}
c.Spawner.disable_user_config = True
c.Spawner.start_timeout = 120
c.Spawner.environment = {{
    "JUPYTER_PATH": "{prefix}/share/jupyter",
    "JUPYTER_CONFIG_PATH": "{prefix}/etc/jupyter",
    "SMOL_KERNEL_RUNTIME_DIR": {os.environ["SMOL_KERNEL_RUNTIME_DIR"]!r},
    "SMOL_KERNEL_CACHE_DIR": {str(cache_dir())!r},  # images and tools, shared by all users
    "SMOL_TEST_HOST_SECRET": "host-only-value",
}}
c.JupyterHub.services = [{{"name": "tester", "api_token": "{TOKEN}"}}]
c.JupyterHub.load_roles = [{{"name": "tester", "services": ["tester"],
    "scopes": ["admin:users", "admin:servers", "access:servers"]}}]
""")
    with open(tmp_path / "hub.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", "jupyterhub_config.py"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    api = requests.Session()
    api.headers["Authorization"] = f"token {TOKEN}"
    wait_until_up(lambda: api.get(f"{base}/hub/api/").ok, proc, tmp_path / "hub.log")
    try:
        yield base, api, tmp_path
    finally:
        proc.terminate()
        proc.wait(30)


def test_hub_user_gets_locked_down_sandboxed_kernels_with_quota_and_culling(hub):
    base, api, tmp = hub
    before = runtime_entries()
    assert api.post(f"{base}/hub/api/users/alice").status_code in (201, 409)
    r = api.post(f"{base}/hub/api/users/alice/server")
    assert r.status_code in (201, 202), r.text
    deadline = time.monotonic() + 120
    while not api.get(f"{base}/hub/api/users/alice").json()["servers"].get("", {}).get("ready"):
        assert time.monotonic() < deadline, (tmp / "hub.log").read_text()[-3000:]
        time.sleep(1)
    user = f"{base}/user/alice"

    specs = api.get(f"{user}/api/kernelspecs").json()
    assert set(specs["kernelspecs"]) == {"smolvm"} and specs["default"] == "smolvm"
    # none may start on the host (python3 is routed to smolvm: tests/security/test_lockdown)
    for name in ("mine", "../kernels/mine"):
        r = api.post(f"{user}/api/kernels", json={"name": name})
        assert r.status_code == 403 and "not allowed" in r.json()["message"], (name, r.text)
    assert api.post(f"{user}/api/terminals").status_code == 404, "lock-down turns them off"
    time.sleep(2)  # a host kernel, had one started, would be running now
    assert api.get(f"{user}/api/kernels").json() == []
    home = str(tmp / "home" / "alice")
    host_kernels = [p for p in processes_mentioning(home) if "ipykernel" in
                    Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]  # fmt: skip
    assert host_kernels == [], "a host kernel runs for alice"

    a = api.post(f"{user}/api/kernels", json={"name": "smolvm"}).json()["id"]
    ws_a = f"ws://127.0.0.1:{base.rsplit(':', 1)[1]}/user/alice/api/kernels/{a}/channels"
    out = ws_execute(ws_a, TOKEN, "import os\nprint(os.environ.get('JUPYTERHUB_API_TOKEN'), "
                     "os.environ.get('SMOL_TEST_HOST_SECRET'), os.uname().release)")  # fmt: skip
    token, secret, release = out.split()
    assert (token, secret) == ("None", "None") and release != os.uname().release
    ps = json.loads(subprocess.run([sys.executable, "-m", "smol_kernel.cli", "ps", "--json"],
                                   capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert [r["user"] for r in ps if r["kernel_id"] == a] == ["alice"]

    # a busy kernel is kept (cull_busy False), an idle one is culled with its VM; a goes
    # busy first, as b's start can take longer than the cull timeout
    busy_ws, _ = ws_send_execute(ws_a, TOKEN, "import time\ntime.sleep(120)")
    b = api.post(f"{user}/api/kernels", json={"name": "smolvm"}).json()["id"]
    r = api.post(f"{user}/api/kernels", json={"name": "smolvm"})
    assert r.status_code == 403 and "max_vms" in r.json()["message"], r.text

    deadline = time.monotonic() + 90
    while {k["id"] for k in api.get(f"{user}/api/kernels").json()} != {a}:
        assert time.monotonic() < deadline, "the idle kernel was not culled"
        time.sleep(2)
    ps = json.loads(subprocess.run([sys.executable, "-m", "smol_kernel.cli", "ps", "--json"],
                                   capture_output=True, text=True, check=True).stdout)  # fmt: skip
    # (ps lists every VM on the machine: other tests' run beside this one)
    alices = {r["kernel_id"] for r in ps if r["user"] == "alice"}
    assert alices == {a}, f"kernel {b} was culled but its VM is left"
    busy_ws.close()

    r = api.delete(f"{base}/hub/api/users/alice/server")
    assert r.status_code in (202, 204)
    deadline = time.monotonic() + 60
    while runtime_entries() != before:
        assert time.monotonic() < deadline, "stopping alice's server left VMs behind"
        time.sleep(1)
    lines = (tmp / "hub.log").read_text().splitlines()
    audit = [json.loads(ln.split("smol-kernel audit: ", 1)[1]) for ln in lines
             if "smol-kernel audit: " in ln]  # fmt: skip
    events = {(e["event"], e["kernel_id"]): e for e in audit}
    assert events["kernel_start", a]["user"] == "alice"
    assert events["kernel_end", b]["reason"] == "shutdown"  # culled
    assert events["kernel_end", a]["reason"] == "server exited"
