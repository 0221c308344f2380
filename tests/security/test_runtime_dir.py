"""The runtime folder belongs to its user alone: one another local user created first (as
under JupyterHub's spawners, where it lives in /tmp), made world-writable or replaced by a
symlink is refused with a clear error, and pids planted in a VM's state are only signalled
when the process is the recorded one and ours."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from smol_kernel.paths import RuntimeDirError, runtime_dir
from smol_kernel.vm.process import RuntimeDir, kill_vm_dir, proc_start_time, vm_processes


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smol_kernel.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize("how", ["other-user", "world-writable", "symlink"])
def test_a_runtime_folder_that_is_not_ours_alone_is_refused(how, tmp_path):
    folder = tmp_path / "rt"
    if how == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "elsewhere")
    else:
        folder.mkdir(mode=0o700)
    if how == "world-writable":
        folder.chmod(0o777)
    if how == "other-user":
        if os.getuid() != 0:
            pytest.skip("making a folder owned by another user needs root")
        os.chown(folder, 65534, 65534)
    env = {**os.environ, "SMOL_KERNEL_RUNTIME_DIR": str(folder)}
    r = _cli(env, "ps")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "runtime folder" in r.stderr and "another user could control" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    saved = os.environ["SMOL_KERNEL_RUNTIME_DIR"]
    os.environ["SMOL_KERNEL_RUNTIME_DIR"] = str(folder)
    try:
        with pytest.raises(RuntimeDirError):
            runtime_dir()
    finally:
        os.environ["SMOL_KERNEL_RUNTIME_DIR"] = saved
    # The positive control: a folder of ours, 0700, is used.
    ours = tmp_path / "ours"
    r = _cli({**os.environ, "SMOL_KERNEL_RUNTIME_DIR": str(ours)}, "ps")
    assert r.returncode == 0, r.stderr
    assert (os.stat(ours).st_mode & 0o777) == 0o700


def test_planted_pids_are_not_signalled_unless_they_are_the_recorded_process(tmp_path):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        start = proc_start_time(victim.pid)
        rt = RuntimeDir(tmp_path / "vm")
        rt.path.mkdir()
        # A state file naming a live process with the wrong start time (or none): not ours.
        for starts in ({"vmm": start + 1}, {}, {"vmm": None}):
            rt.write_state({"pids": {"vmm": victim.pid}, "starts": starts})
            assert vm_processes(rt, rt.read_state()) == []
            kill_vm_dir(rt, rt.read_state(), grace=0.2)
            assert victim.poll() is None, "a planted pid was killed"
            rt.path.mkdir()
        if os.getuid() == 0:  # the right start time, but another user's process
            other = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534",
                                      "--clear-groups", "sleep", "60"])  # fmt: skip
            try:
                time.sleep(0.3)
                rt.write_state({"pids": {"vmm": other.pid},
                                "starts": {"vmm": proc_start_time(other.pid)}})  # fmt: skip
                assert vm_processes(rt, rt.read_state()) == []
                kill_vm_dir(rt, rt.read_state(), grace=0.2)
                assert other.poll() is None, "another user's process was killed"
                rt.path.mkdir()
            finally:
                other.kill()
                other.wait()
        # The positive control: the recorded process itself is found and killed.
        rt.write_state({"pids": {"vmm": victim.pid}, "starts": {"vmm": start}})
        assert vm_processes(rt, rt.read_state()) == [victim.pid]
        kill_vm_dir(rt, rt.read_state(), grace=2)
        assert victim.wait(5) is not None
    finally:
        victim.kill()
        victim.wait()
    assert not (tmp_path / "vm").exists()
