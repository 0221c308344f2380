"""allow_hosts: a kernel reaches the names and addresses on its list and nothing else, fast.

A test "internet" in a network namespace (``egress_services.py``): a DNS server answering
allowed.test, api.allowed.test and blocked.test, HTTP on every address (ports 80, 8080 and
8081), a TLS-ish port 443 that records what it receives, and a package index. Each refusal
is checked against a positive control (the same probe on a kernel with the network simply
on, which must get through) and the guard's own log."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from smol_kernel.cli import main as cli_main
from smol_kernel.sandbox import AsyncSandbox

from ..conftest import install_spec
from ..kernel_helpers import run_cell, start_kernel, stop_kernel
from .egress_world import fetch, outside_world

pytestmark = pytest.mark.vm
SERVICES = Path(__file__).with_name("egress_services.py")
FAST = 1.0  # seconds: a refusal must come at once, not after a client's timeout


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with outside_world(tmp_path_factory.mktemp("egress-index")) as world:
        yield world


def tls_log(world) -> list[str]:
    return fetch(world, "/tls")


@pytest.fixture(scope="module")
async def allow_kernel(jupyter_prefix, world):
    spec = install_spec(
        jupyter_prefix, "smolvm-allow", "--backend", "qemu", "--memory-mib", "512",
        "--dns-server", world["allowed"], "--private-answer-range", "10.204.0.0/16",
        "--allow-host", "allowed.test:8080", "--allow-host", "allowed.test:443",
        "--allow-host", "*.allowed.test", "--allow-host", f"{world['cidr']}/32",
    )  # fmt: skip
    km, kc = await start_kernel(spec)
    yield km, kc
    await stop_kernel(km, kc)


PROBES = """
import json, socket, ssl, time, urllib.request
urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({{}})))

def attempt(fn):
    t = time.monotonic()
    try:
        result, ok = fn(), True
    except Exception as e:
        result, ok = f"{{type(e).__name__}}: {{e}}", False
    return {{"ok": ok, "result": str(result)[:300], "s": round(time.monotonic() - t, 3)}}

def get(url):
    return urllib.request.urlopen(url, timeout=20).read().decode()

ctx = ssl.create_default_context()  # loading CA files is slow under TCG: not timed
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

def tls(host, sni):
    with socket.create_connection((host, 443), timeout=20) as s:
        with ctx.wrap_socket(s, server_hostname=sni):
            return "handshake done"

print(json.dumps({{
    "allowed": attempt(lambda: get("http://allowed.test:8080/marker")),
    "blocked_name": attempt(lambda: socket.gethostbyname("blocked.test")),
    "blocked_ip": attempt(lambda: get("http://{blocked}:8080/marker")),
    "other_port": attempt(lambda: get("http://allowed.test:8081/marker")),
    "wildcard": attempt(lambda: get("http://api.allowed.test/marker")),
    "cidr": attempt(lambda: get("http://{cidr}:8080/marker")),
    "tls_other_sni": attempt(lambda: tls("allowed.test", "evil.test")),
    "tls_allowed_sni": attempt(lambda: tls("allowed.test", "allowed.test")),
}}))
"""


async def probe(kc, world) -> dict:
    r = await run_cell(kc, PROBES.format(**world), timeout=180)
    assert r.status == "ok", (r.ename, r.evalue, r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


async def test_only_the_allowed_destinations_are_reached_and_the_rest_fail_fast(
    allow_kernel, world, capsys
):
    km, kc = allow_kernel
    got = await probe(kc, world)
    assert got["allowed"] == {**got["allowed"], "ok": True,
                              "result": f"marker {world['allowed']}:8080"}, got  # fmt: skip
    assert got["wildcard"]["result"] == f"marker {world['api']}:80", "*.allowed.test, port 80"
    assert got["cidr"]["result"] == f"marker {world['cidr']}:8080", "a CIDR entry"
    for refused, says in [("blocked_name", "gaierror"), ("blocked_ip", "Connection refused"),
                          ("other_port", "Connection refused"),
                          ("tls_other_sni", "ConnectionResetError")]:  # fmt: skip
        assert not got[refused]["ok"] and says in got[refused]["result"], (refused, got)
        assert got[refused]["s"] < FAST, (refused, got[refused])
    # The allowed SNI reached the TLS port (its answer is not TLS); the other never did.
    assert not got["tls_allowed_sni"]["ok"]
    assert "SSLError" in got["tls_allowed_sni"]["result"], got["tls_allowed_sni"]
    seen = tls_log(world)
    assert any("allowed.test" in hello for hello in seen), "the positive control reached it"
    assert not any("evil.test" in hello for hello in seen), "the other SNI never left"

    # Allowed: the address the host connected to; refused names: the synthetic address the
    # guest was given (198.18/15), or the proxy's own for a name it would not resolve.
    a, b, synthetic = world["allowed"], world["blocked"], "198.18."
    expected = {("allowed.test", a, 8080, "http", "allowed"),
                ("blocked.test", "10.0.2.3", 53, "dns", "blocked"),
                (None, b, 8080, "tcp", "blocked"),
                ("allowed.test", synthetic, 8081, "tcp", "blocked"),
                ("evil.test", synthetic, 443, "tls", "blocked"),
                ("allowed.test", a, 443, "tls", "allowed")}  # fmt: skip
    deadline = time.monotonic() + 5  # allowed attempts reach the file within 0.2 s
    while True:
        capsys.readouterr()
        assert cli_main(["logs", "--network", "--json", km.kernel_id]) == 0
        log = json.loads(capsys.readouterr().out)
        seen_entries = {(e["name"], synthetic if e["address"].startswith(synthetic)
                         else e["address"], e["port"], e["protocol"], e["verdict"])
                        for e in log["entries"]}  # fmt: skip
        if expected <= seen_entries or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert expected <= seen_entries, (expected - seen_entries, sorted(seen_entries, key=str))
    assert log["blocked"] >= 4 and log["allow_hosts"]
    assert cli_main(["logs", "--network", km.kernel_id]) == 0
    text = capsys.readouterr().out
    assert "allow-list: allowed.test:8080" in text and "evil.test (" in text


async def test_a_rewind_keeps_the_kernels_egress_log_and_its_names(allow_kernel, world, capsys):
    """A rewind replaces the VM and its proxy: the log is the kernel's, not the VM's (what
    was refused before is still there), and a name keeps its synthetic address (a
    connection the guest opens to an address it learnt before still works)."""
    km, kc = allow_kernel
    before_rewind = """
import socket, urllib.request
addr = socket.gethostbyname("allowed.test")
try:
    socket.gethostbyname("before-rewind.blocked.test")
except OSError:
    pass
"""
    r = await run_cell(kc, before_rewind + "%checkpoint egress", timeout=180)
    assert r.status == "ok", (r.ename, r.evalue, r.stderr)
    r = await run_cell(kc, "%rewind egress", timeout=180)
    assert r.status == "ok", (r.ename, r.evalue, r.stderr)
    after = """
urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))
cached = urllib.request.Request(f"http://{addr}:8080/marker", headers={"Host": "allowed.test"})
print(urllib.request.urlopen(cached, timeout=20).read().decode(),
      socket.gethostbyname("allowed.test") == addr)
"""
    r = await run_cell(kc, after, timeout=180)
    assert r.status == "ok", (r.ename, r.evalue, r.stderr)
    assert r.stdout.split() == ["marker", f"{world['allowed']}:8080", "True"], r.stdout
    capsys.readouterr()
    assert cli_main(["logs", "--network", "--json", km.kernel_id]) == 0
    names = {(e["name"], e["verdict"]) for e in json.loads(capsys.readouterr().out)["entries"]}
    assert ("before-rewind.blocked.test", "blocked") in names, sorted(names, key=str)


async def test_positive_control_the_same_probes_get_through_with_network_on(
    jupyter_prefix, world, caplog
):
    spec = install_spec(jupyter_prefix, "smolvm-open", "--backend", "qemu", "--network",
                        "--dns-server", world["allowed"], "--memory-mib", "512")  # fmt: skip
    km, kc = await start_kernel(spec)
    caplog.set_level(logging.INFO)
    try:
        got = await probe(kc, world)
        # Without a list the host is still refused, and the log says so.
        r = await run_cell(kc, "import socket\nsocket.socket(socket.AF_INET, "
                           "socket.SOCK_DGRAM).sendto(b'x', ('10.0.2.2', 9))")  # fmt: skip
        assert r.status == "ok", r.evalue
    finally:
        await stop_kernel(km, kc)
    ends = [
        json.loads(rec.getMessage().split("audit: ", 1)[1])
        for rec in caplog.records
        if "smol-kernel audit:" in rec.getMessage() and '"kernel_end"' in rec.getMessage()
    ]
    (end,) = [e for e in ends if e["kernel_id"] == km.kernel_id]
    assert end["egress"]["blocked"] >= 1 and "10.0.2.2:9/udp" in end["egress"]["blocked_to"]
    assert end["egress"]["allowed"] >= 4, end
    assert got["blocked_name"] == {**got["blocked_name"], "ok": True,
                                   "result": world["blocked"]}  # fmt: skip
    assert got["blocked_ip"]["result"] == f"marker {world['blocked']}:8080"
    assert got["other_port"]["result"] == f"marker {world['allowed']}:8081"
    assert "SSLError" in got["tls_other_sni"]["result"], "it reached the TLS port"
    assert any("evil.test" in hello for hello in tls_log(world))


PIP = """
import subprocess, sys, time, urllib.request
urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({{}})))
with open("/tmp/pip.zip", "wb") as f:
    f.write(urllib.request.urlopen("http://allowed.test:8080/files/pip.zip", timeout=60).read())
t = time.monotonic()
r = subprocess.run([sys.executable, "/tmp/pip.zip/pip", "install", "--no-cache-dir",
                    "--disable-pip-version-check", "--target", "/tmp/site{n}",
                    "--index-url", "http://{index}:8080/files/simple/",
                    "--trusted-host", "{index}", "smoltiny"],
                   capture_output=True, text=True)
print("SECONDS", round(time.monotonic() - t, 1), "EXIT", r.returncode)
print(r.stdout[-1500:], r.stderr[-1500:])
"""


async def test_pip_installs_from_an_allowed_index_and_fails_fast_from_another(allow_kernel, world):
    _, kc = allow_kernel
    r = await run_cell(kc, PIP.format(n=1, index="allowed.test"), timeout=400)
    assert r.status == "ok" and "EXIT 0" in r.stdout, (r.stdout, r.stderr, r.evalue)
    allowed_s = float(r.stdout.split("SECONDS", 1)[1].split()[0])
    r = await run_cell(kc, "import sys; sys.path.insert(0, '/tmp/site1')\n"
                       "import smoltiny; print(smoltiny.VALUE)", timeout=60)  # fmt: skip
    assert r.stdout.strip() == "42"
    r = await run_cell(kc, PIP.format(n=2, index="blocked.test"), timeout=400)
    assert r.status == "ok" and "EXIT 0" not in r.stdout, r.stdout
    seconds = float(r.stdout.split("SECONDS", 1)[1].split()[0])
    assert "blocked.test" in r.stdout and "Failed to establish a new connection" in r.stdout, (
        r.stdout
    )
    # pip itself retries 5 times with a backoff; each refusal comes at once. Against the
    # allowed install in the same kernel (pip's own start under TCG is most of both, and
    # varies with load): a refusal that waited for pip's 15 s connect timeout would add
    # 75 s or more.
    assert seconds < allowed_s + 45, (allowed_s, r.stdout)


async def test_a_sandbox_execution_names_what_was_refused(world):
    from smol_kernel.audit import egress_blocked_total

    before = egress_blocked_total()
    async with AsyncSandbox(allow_hosts=["allowed.test:8080"], dns_servers=[world["allowed"]],
                            private_answer_ranges=["10.204.0.0/16"], pool_size=0,
                            memory_mib=512) as sb:  # fmt: skip
        ex = await sb.run_code(
            "import urllib.request as u\n"
            "u.install_opener(u.build_opener(u.ProxyHandler({})))\n"
            "print(u.urlopen('http://allowed.test:8080/marker', timeout=20).read().decode())\n"
            f"u.urlopen('http://{world['blocked']}:8080/marker', timeout=20)\n",
            timeout=120,
        )
        assert "".join(ex.logs.stdout) == f"marker {world['allowed']}:8080\n"
        assert ex.status == "error" and "refused" in ex.error.value, ex.error
        assert ex.blocked == [f"{world['blocked']}:8080/tcp"], ex.blocked
        assert "[network: the sandbox refused connections to " in ex.report()
        clean = await sb.run_code("1 + 1")
        assert clean.blocked == [] and "[network" not in clean.report()
        assert egress_blocked_total() > before, "the Prometheus counter's source counts it"


async def test_without_network_nothing_is_reached(world):
    async with AsyncSandbox(memory_mib=512, pool_size=0) as sb:
        ex = await sb.run_code(
            "import socket\n"
            "s = socket.socket(); s.settimeout(5)\n"
            f"print(s.connect_ex(({world['allowed']!r}, 8080)))\n"
        )
    assert ex.status == "ok" and ex.logs.stdout != ["0\n"], ex.logs


def test_bad_entries_fail_before_any_vm(jupyter_prefix, capsys):
    assert cli_main(["install", "--prefix", str(jupyter_prefix), "--name", "smolvm-bad-allow",
                     "--allow-host", "pypi.org:http", "--no-server-extension"]) != 0  # fmt: skip
    assert "--allow-host" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a port"):
        AsyncSandbox(allow_hosts=["pypi.org:http"])


async def test_an_mcp_client_learns_the_list_and_why_a_request_failed(world):
    from mcp import ClientSession, StdioServerParameters, stdio_client

    from ..web_helpers import server_env

    env = {**server_env(), "SMOL_KERNEL_TEMPLATES_DIR": os.environ["SMOL_KERNEL_TEMPLATES_DIR"]}
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "smol_kernel.cli", "mcp", "--pool-size", "0", "--memory-mib", "512",
              "--allow-host", "allowed.test:8080", "--dns-server", world["allowed"],
              "--private-answer-range", "10.204.0.0/16"],
        env=env,
    )  # fmt: skip
    async with stdio_client(params) as (read, write), ClientSession(read, write) as mcp:
        init = await mcp.initialize()
        assert "can reach only these destinations" in (init.instructions or "")
        assert "allowed.test:8080" in (init.instructions or "")
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
        assert tools["run_python"].annotations.open_world_hint is True
        code = ("import urllib.request as u\n"
                "u.install_opener(u.build_opener(u.ProxyHandler({})))\n"
                "print(u.urlopen('http://allowed.test:8080/marker', timeout=20).read())\n"
                "u.urlopen('http://blocked.test:8080/marker', timeout=20)\n")  # fmt: skip
        result = await mcp.call_tool("run_python", {"code": code})
        text = result.content[0].text
        assert result.is_error and f"marker {world['allowed']}:8080" in text, text
        assert "[network: the sandbox refused connections to blocked.test (" in text, text
