"""Nothing is left behind, however a client exits (issue: a client that never calls the
provisioner's cleanup left its VM's runtime dir -- overlay disk, console log -- behind).

Each test runs a real client in its own Python process, lets it exit its way, and asserts
no VM process, no runtime dir and no overlay disk remain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from smol_kernel import paths
from smol_kernel.cli import main as cli_main

from .conftest import processes_mentioning, runtime_entries

pytestmark = pytest.mark.vm

START = """
import asyncio, sys
from jupyter_client.manager import AsyncKernelManager

async def start():
    km = AsyncKernelManager(kernel_name={spec!r})
    await km.start_kernel()
    kc = km.client(); kc.start_channels()
    await kc.wait_for_ready(timeout=120)
    reply = await kc.execute_interactive("print('ran')", timeout=60)
    print("VM", km.provisioner.vm.runtime_dir, reply["content"]["status"], flush=True)
    return km, kc
"""


def run_client(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def vm_dir_of(proc: subprocess.CompletedProcess) -> str:
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VM ")), None)
    assert line, f"the client never had a VM: {proc.stdout}\n{proc.stderr[-2000:]}"
    _, rt, status = line.split()
    assert status == "ok"
    return rt


def assert_nothing_left(rt: str, before: set[str]) -> None:
    assert processes_mentioning(rt) == [], "a VM process outlived its client"
    assert runtime_entries() <= before, f"runtime dirs left: {runtime_entries() - before}"


def test_a_script_that_never_shuts_its_kernel_down(smolvm_spec):
    before = runtime_entries()
    proc = run_client(START.format(spec=smolvm_spec) + "asyncio.run(start())\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_nothing_left(vm_dir_of(proc), before)


def test_an_exception_after_the_kernel_started(smolvm_spec):
    before = runtime_entries()
    code = START.format(spec=smolvm_spec) + (
        "async def main():\n"
        "    await start()\n"
        "    raise RuntimeError('the runner failed')\n"
        "asyncio.run(main())\n"
    )
    proc = run_client(code)
    assert proc.returncode == 1 and "the runner failed" in proc.stderr
    assert_nothing_left(vm_dir_of(proc), before)


def test_an_exception_inside_nbclient_execution(smolvm_spec, tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("raise ValueError('cell failed')")]
    )
    path = tmp_path / "fails.ipynb"
    nbformat.write(nb, path)
    before = runtime_entries()
    proc = run_client(f"""
        import nbformat
        from nbclient import NotebookClient
        nb = nbformat.read({str(path)!r}, as_version=4)
        NotebookClient(nb, kernel_name={smolvm_spec!r}, timeout=120).execute()
    """)  # fmt: skip
    # The cell's error came from the kernel, so a VM ran.
    assert proc.returncode == 1 and "cell failed" in proc.stderr, proc.stderr[-2000:]
    assert runtime_entries() <= before, f"runtime dirs left: {runtime_entries() - before}"


def test_a_sigkilled_client_leaves_only_what_ps_removes(smolvm_spec, capsys):
    before = runtime_entries()
    proc = run_client(START.format(spec=smolvm_spec) + (
        "import os, signal\n"
        "asyncio.run(start())\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    ))  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    rt = vm_dir_of(proc)
    # The VM dies with its owner (parent-death signal: delivered at once, though a loaded
    # host may take a moment to run the exit); its folder cannot go with it.
    deadline = time.monotonic() + 10
    while processes_mentioning(rt):
        assert time.monotonic() < deadline, f"the VM outlived its owner: {processes_mentioning(rt)}"
        time.sleep(0.2)
    assert rt.rsplit("/", 1)[1] in runtime_entries()
    capsys.readouterr()
    assert cli_main(["ps", "--json"]) == 0
    out = capsys.readouterr()
    assert rt.rsplit("/", 1)[1] in out.err, "ps says what it removed"
    assert all(row["vm"] != rt.rsplit("/", 1)[1] for row in json.loads(out.out))
    assert_nothing_left(rt, before)


def test_smol_kernel_run_interrupted_with_ctrl_c(smolvm_spec, tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("print('started', flush=True)\nimport time; time.sleep(600)"),
    ])  # fmt: skip
    path = tmp_path / "long.ipynb"
    nbformat.write(nb, path)
    before = runtime_entries()
    proc = subprocess.Popen(
        [sys.executable, "-m", "smol_kernel.cli", "run", str(path), "--kernel", smolvm_spec],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (new := runtime_entries() - before):  # the VM is up
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        time.sleep(15)  # into the long cell (boot and kernel start under TCG)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    (vm_id,) = new
    assert_nothing_left(str(paths.runtime_dir() / vm_id), before)


def test_jupyter_console_exit(smolvm_spec):
    """The reported case: `jupyter console --kernel smolvm`, a cell, `exit`, confirm."""
    pexpect = pytest.importorskip("pexpect", reason="pexpect drives jupyter console in a pty")
    before = runtime_entries()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120", "LINES": "40"}
    argv = ["-m", "jupyter_console", "--simple-prompt", "--kernel", smolvm_spec]
    child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", timeout=180,
                          dimensions=(40, 120))  # fmt: skip
    try:
        child.expect(r"In \[1\]")
        child.sendline("print(6 * 7, open('/proc/1/cmdline').read().count('agent'))")
        child.expect(r"42 1")
        new = runtime_entries() - before
        assert len(new) == 1, "the console's kernel runs in a VM of ours"
        child.expect(r"In \[2\]")
        child.sendline("exit")
        i = child.expect([r"\(\[y\]/n\)", pexpect.EOF])
        if i == 0:
            child.sendline("y")
            child.expect(pexpect.EOF, timeout=120)
    finally:
        child.close(force=True)
    (vm_id,) = new
    assert_nothing_left(str(paths.runtime_dir() / vm_id), before)


def test_a_script_that_never_kills_its_blocking_sandbox():
    """The blocking Sandbox's loop thread must not hold the interpreter open (a non-daemon
    loop thread, as anyio's portal has, would hang this script at exit)."""
    before = runtime_entries()
    code = (
        "from smol_kernel.sandbox import Sandbox\n"
        "sb = Sandbox(pool_size=0)\n"
        "print('VM', sb.provisioner.vm.runtime_dir, sb.run_code('1+1').text == '2'"
        " and 'ok', flush=True)\n"
    )
    proc = run_client(code, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_nothing_left(vm_dir_of(proc), before)
