"""AI notebook assistants as people run them (issue 36): Datalayer's jupyter-mcp-server, from
PyPI, driven over stdio by the mcp SDK's client against a real Jupyter server with
jupyter-collaboration. It asks for its kernel by the name ``python3``:

* on a locked-down server (``install --lockdown``: python3 routed to smolvm) its code runs
  in a VM -- the guest's hostname, only ``lo``, no host file -- and its outputs pass the
  output policy; the VM is gone once the kernel is shut down;
* on a server that is not locked down, with ``install --alias python3``, the same;
* controls: locked down without the alias, the assistant gets 403s; neither, its code runs
  on the host. So the probe can tell a VM from the host.

jupyter-mcp-server and jupyter-collaboration live in ``.venv-assistants`` (the
``assistants`` extra, scripts/setup.sh), with this checkout installed there too, so the
server runs our provisioner; the suite's own servers never load collaboration.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from .conftest import runtime_entries
from .web_helpers import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-assistants"
MCP_SERVER = VENV / "bin" / "jupyter-mcp-server"
NOT_INSTALLED = "the assistants extra is not installed (scripts/setup.sh --test makes it)"
pytestmark = [pytest.mark.vm, pytest.mark.skipif(not MCP_SERVER.exists(), reason=NOT_INSTALLED)]
HOST_MARKER = Path("/tmp") / f"smol-assistant-marker-{os.getpid()}"  # on the host only
PROBE = """\
import os, socket
print("host:", socket.gethostname())
print("nics:", ",".join(sorted(os.listdir("/sys/class/net"))))
print("marker:", os.path.exists({marker!r}))
"""
HOSTILE = ("from IPython.display import HTML, display\n"
           "display(HTML('<img src=x onerror=\"alert(1)\"><b>bold</b>'))")  # fmt: skip


def _install(prefix: Path, mode: str) -> None:
    """A smolvm kernelspec under ``prefix``, and the server configuration ``mode`` names."""
    args = ["install", "--prefix", str(prefix), "--pool-size", "0", "--memory-mib", "640",
            "--no-server-extension"]  # fmt: skip
    if mode in ("locked", "locked-no-alias"):
        args.append("--lockdown")
    if mode == "alias":
        args += ["--alias", "python3"]
    subprocess.run([VENV / "bin" / "smol-kernel", *args], check=True, capture_output=True)
    conf_file = prefix / "etc" / "jupyter" / "jupyter_server_config.json"
    if mode == "locked-no-alias":  # as the lock-down was before aliases
        conf = json.loads(conf_file.read_text())
        del conf["ServerApp"]["kernel_manager_class"], conf["RoutingKernelManager"]
        conf_file.write_text(json.dumps(conf))


@contextlib.contextmanager
def jupyter_server(tmp: Path, mode: str):
    """A Jupyter server of the assistants' venv (jupyter-collaboration loaded)."""
    prefix = tmp / f"prefix-{mode}"
    _install(prefix, mode)
    root = tmp / f"root-{mode}"
    root.mkdir()
    token, port = uuid.uuid4().hex, free_port()
    env = {**os.environ, "JUPYTER_PATH": f"{prefix}/share/jupyter",
           "JUPYTER_CONFIG_PATH": f"{prefix}/etc/jupyter",
           "JUPYTER_DATA_DIR": str(tmp / f"data-{mode}"),
           "JUPYTER_RUNTIME_DIR": str(tmp / f"runtime-{mode}")}  # fmt: skip
    log_path = tmp / f"server-{mode}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [VENV / "bin" / "python", "-m", "jupyter_server", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_up(lambda: requests.get(f"{url}/api/status", params={"token": token}).ok,
                  proc, log_path)  # fmt: skip
    try:
        yield url, token, root, log_path
    finally:
        with contextlib.suppress(Exception):
            for kernel in requests.get(f"{url}/api/kernels", params={"token": token}).json():
                requests.delete(f"{url}/api/kernels/{kernel['id']}", params={"token": token})
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _text(result) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


async def drive(url: str, token: str) -> dict:
    """What an assistant does first: create a notebook, insert and run a cell, run code,
    read the notebook back. Returns each tool's text (and whether it was an error)."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=str(MCP_SERVER),
        args=["start", "--transport", "stdio", "--jupyter-url", url, "--jupyter-token", token,
              "--start-new-code-sandbox", "false"],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")},
    )  # fmt: skip
    out: dict[str, tuple[bool, str]] = {}
    async with stdio_client(params) as (read, write), ClientSession(read, write) as mcp:
        await mcp.initialize()
        tools = {t.name for t in (await mcp.list_tools()).tools}
        assert {"use_notebook", "insert_execute_code_cell", "execute_code",
                "read_notebook"} <= tools, tools  # fmt: skip

        async def call(name: str, **arguments) -> None:
            result = await mcp.call_tool(name, arguments)
            out[name] = (bool(result.is_error), _text(result))

        await call("use_notebook", notebook_name="assist", notebook_path="assist.ipynb",
                   mode="create", kernel_id="NEW")  # fmt: skip
        await call("insert_execute_code_cell", cell_index=0,
                   cell_source=PROBE.format(marker=str(HOST_MARKER)), timeout=300)  # fmt: skip
        await call("execute_code", code=HOSTILE, timeout=120)
        await call("read_notebook", notebook_name="assist")
    return out


@pytest.fixture(scope="module", autouse=True)
def host_marker():
    HOST_MARKER.write_text("on the host only")
    yield
    HOST_MARKER.unlink(missing_ok=True)


def _vm_ran(out: dict) -> None:
    error, text = out["insert_execute_code_cell"]
    assert not error, text
    assert f"host: {socket.gethostname()}" not in text, f"the cell ran on the host: {text}"
    assert "nics: lo" in text and "marker: False" in text, text
    error, text = out["execute_code"]
    assert not error, text
    assert "onerror" not in text and "alert" not in text, text
    error, text = out["read_notebook"]
    assert not error and "import os, socket" in text, text  # the cell the assistant added


@pytest.mark.parametrize("mode", ["locked", "alias"])
async def test_jupyter_mcp_server_runs_its_code_in_a_vm(tmp_path, mode):
    before = runtime_entries()
    with jupyter_server(tmp_path, mode) as (url, token, _, log):
        out = await drive(url, token)
        _vm_ran(out)
        kernels = requests.get(f"{url}/api/kernels", params={"token": token}).json()
        assert [k["name"] for k in kernels] == ["smolvm"], kernels
        assert "'python3' was asked for; starting kernelspec 'smolvm'" in log.read_text()
        for kernel in kernels:
            requests.delete(f"{url}/api/kernels/{kernel['id']}", params={"token": token})
        deadline = time.monotonic() + 60
        while runtime_entries() - before:
            assert time.monotonic() < deadline, "the kernel's VM outlived its shutdown"
            time.sleep(0.5)


async def test_without_the_alias_the_assistant_is_refused_or_runs_on_the_host(tmp_path):
    """The controls: the same assistant on a locked-down server without the alias gets 403s
    (it cannot work at all), and on a plain server its code runs on the host."""
    with jupyter_server(tmp_path, "locked-no-alias") as (url, token, _, _log):
        out = await drive(url, token)
        error, text = out["use_notebook"]
        assert "403" in text or "not allowed" in text or error, out
    with jupyter_server(tmp_path, "plain") as (url, token, _, _log):
        out = await drive(url, token)
        _, text = out["insert_execute_code_cell"]
        assert f"host: {socket.gethostname()}" in text and "marker: True" in text, out
