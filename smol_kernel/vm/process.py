"""Host processes behind a VM: spawning them so they die with their owner, the per-VM
runtime directory and its ``state.json``, and reaping what a crashed owner left behind.

Parent-death signal: Linux delivers ``PR_SET_PDEATHSIG`` when the *thread* that forked the
child exits, not the process. jupyter_client runs provisioner hooks on short-lived threads
(``run_sync``), so every spawn goes through one long-lived spawner thread. The signal then
fires exactly when the owning process dies, however it dies (SIGKILL included).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import paths
from ..exit_hooks import on_exit
from ..trusted import helper_env
from . import console
from .base import Vm, VmError
from .spec import Isolation, VmSpec

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # If the owner died between fork and prctl, nobody will ever signal us.
    if os.getppid() == 1:
        os._exit(1)


def spawn(
    argv: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen:
    """Start ``argv`` with stdout/stderr to ``log_path``; it is SIGKILLed if we die.
    Only ``pass_fds`` (same numbers) are inherited besides stdio. It starts in the log's
    folder (the VM's runtime dir, never the server's working folder) with ``env``, by
    default ``trusted.helper_env()`` (``PATH`` only)."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smol-spawner")

    def _do() -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env if env is not None else helper_env(),
                cwd=log_path.parent,
                preexec_fn=_die_with_parent,
                close_fds=True,
                pass_fds=pass_fds,
                start_new_session=True,  # no terminal signals (Ctrl-C) reach the VMM
            )

    return _spawner.submit(_do).result()


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, to tell PID reuse apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


MAX_STATE_BYTES = 64 << 10


def read_bounded(path: Path, limit: int) -> bytes | None:
    """At most ``limit`` bytes of a regular file, never through a symlink; None if the file
    is larger (a file we wrote is never that large: someone else wrote it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    return None if len(data) > limit else data


class RuntimeDir:
    """``<runtime>/<vm-id>/``: everything one VM owns on the host."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.id = path.name

    @classmethod
    def create(cls) -> RuntimeDir:
        base = paths.runtime_dir()
        while True:
            path = base / secrets.token_hex(4)
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                continue
            rt = cls(path)
            rt.write_state(owner_state())  # so a crash at any later point is reaped
            return rt

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def write_state(self, state: dict) -> None:
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.rename(self.state_file)

    def read_state(self) -> dict:
        """The recorded state, or {} if missing, oversized, a link or not a JSON object."""
        try:
            state = json.loads(read_bounded(self.state_file, MAX_STATE_BYTES) or b"null")
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @property
    def overlay(self) -> Path:
        return self.path / "overlay.ext4"

    def create_overlay(self, size_mib: int) -> Path:
        """The VM's writable disk: a sparse ext4 image capped at ``size_mib``."""
        with open(self.overlay, "wb") as f:
            f.truncate(size_mib << 20)
        proc = subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0",
             "-E", "lazy_itable_init=1", str(self.overlay)],
            capture_output=True, text=True, cwd=self.path, env=helper_env(),
        )  # fmt: skip
        if proc.returncode != 0:
            raise VmError(f"cannot create the writable overlay disk: {proc.stderr.strip()}")
        return self.overlay


def stop_processes(procs) -> None:
    """Kill whichever of ``procs`` (Popen or None) still run, and reap them all."""
    for proc in procs:
        if proc is None:
            continue
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def owner_state() -> dict:
    """Who owns a VM: this process, and the person it serves (the JupyterHub user under a
    Hub, else the login name) for ``smol-kernel ps`` and the audit log."""
    pid = os.getpid()
    return {"owner_pid": pid, "owner_start": proc_start_time(pid), "user": owner_user()}


def owner_user() -> str:
    if user := os.environ.get("JUPYTERHUB_USER"):
        return user
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (containers)
        return str(os.getuid())


def _proc_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def same_process(pid: object, start: object) -> bool:
    """Is ``pid`` the process a state file recorded -- same start time, and ours (uid)? A
    reused PID, or a recorded one that is not ours, is never signalled."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return False
    if not isinstance(start, int) or isinstance(start, bool):
        return False
    return proc_start_time(pid) == start and _proc_uid(pid) == os.getuid()


def _alive(pid: object, start: object) -> bool:
    return same_process(pid, start)


def vm_processes(rt: RuntimeDir, state: dict) -> list[int]:
    """PIDs of the VM's processes that still run: each recorded pid whose start time and
    owner match what was recorded."""
    starts = state.get("starts") if isinstance(state.get("starts"), dict) else {}
    pids = state.get("pids")
    return [pid for name, pid in (pids.items() if isinstance(pids, dict) else ())
            if same_process(pid, starts.get(name))]  # fmt: skip


def list_vms() -> list[tuple[RuntimeDir, dict]]:
    base = paths.runtime_dir()
    out = []
    for d in sorted(base.iterdir()) if base.exists() else []:
        if not d.is_dir():
            continue
        rt = RuntimeDir(d)
        state = rt.read_state()
        # A dir without state is either being created right now or a crash leftover.
        if state or time.time() - d.stat().st_mtime > 60:
            out.append((rt, state))
    return out


def kill_vm_dir(rt: RuntimeDir, state: dict, grace: float = 1.0) -> None:
    """Kill a VM's processes (VMM first) and remove its runtime dir."""
    pids = vm_processes(rt, state)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(proc_start_time(p) for p in pids):
        for p in pids:  # reap if they are our children
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p, os.WNOHANG)
        time.sleep(0.02)
    rt.remove()


def reap_orphans() -> list[str]:
    """Kill VMs whose owner process is gone and remove their runtime dirs. Returns VM ids."""
    reaped = []
    for rt, state in list_vms():
        if not _alive(state.get("owner_pid"), state.get("owner_start")):
            kill_vm_dir(rt, state)
            reaped.append(rt.id)
    return reaped


_open_vms: weakref.WeakSet[ProcessVm] = weakref.WeakSet()


def _close_open_vms() -> None:
    """A client that exits without cleanup (a script that never calls shutdown_kernel, an
    exception in a notebook runner, ``jupyter console``'s exit): its VMs would die by the
    parent-death signal anyway, but their runtime dirs (overlay disk, console log) would
    stay. Close them now; SIGKILL leaves them to ``reap_orphans`` (``smol-kernel ps``)."""
    for vm in list(_open_vms):
        with contextlib.suppress(Exception):
            vm.close_now()


on_exit("close_vms", _close_open_vms)


class ProcessVm(Vm):
    """A VM that is one VMM process, plus helper processes that must die with it. Closed
    (processes stopped, runtime dir removed) by ``close()``, or at interpreter exit."""

    def __init__(
        self,
        spec: VmSpec,
        rt: RuntimeDir,
        isolation: Isolation,
        vmm: subprocess.Popen,
        helpers: tuple[subprocess.Popen, ...] = (),
    ) -> None:
        self.spec, self.rt, self.id = spec, rt, rt.id
        self.runtime_dir = rt.path
        self.isolation = isolation
        self._vmm: subprocess.Popen | None = vmm
        self._helpers = list(helpers)
        self._status: int | None = None
        self.started = time.time()
        self.pooled = False
        self.pool_ready = False
        self._backend_name = ""
        console.watch(self.console_log)
        _open_vms.add(self)

    @property
    def pid(self) -> int | None:
        return self._vmm.pid if self._vmm else None

    def poll(self) -> int | None:
        if self._status is None and self._vmm is not None:
            self._status = self._vmm.poll()
            if self._status is not None:
                self._stop_helpers()  # they die with their VM, not later at close()
        return self._status

    def _stop_helpers(self) -> None:
        stop_processes(self._helpers)

    async def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"VM {self.id} still running after {timeout}s")
            await asyncio.sleep(0.05)
        return status

    def terminate(self) -> None:
        if self._vmm and self.poll() is None:
            self._vmm.terminate()

    def kill(self) -> None:
        if self._vmm and self.poll() is None:
            self._vmm.kill()

    def record_state(self, backend: str) -> None:
        """Write what ``smol-kernel ps`` and orphan reaping need to find this VM."""
        spec = self.spec
        self._backend_name = backend
        pids = {"vmm": self.pid, **{f"helper{i}": p.pid for i, p in enumerate(self._helpers)}}
        starts = {name: proc_start_time(pid) for name, pid in pids.items() if pid}
        self.rt.write_state({
            **owner_state(), "id": self.id, "backend": backend,
            "isolation": str(self.isolation), "label": spec.label, "image": spec.image,
            "vcpus": spec.vcpus, "memory_mib": spec.memory_mib, "disk_mib": spec.disk_mib,
            "network": spec.network, "shares": [str(s) for s in spec.shares],
            "created": self.started, "pids": pids, "starts": starts, "pooled": self.pooled,
            "pool_ready": self.pool_ready,
        })  # fmt: skip

    def set_label(self, label: str, pooled: bool = False, ready: bool = False) -> None:
        self.spec = dataclasses.replace(self.spec, label=label)
        self.pooled, self.pool_ready = pooled, pooled and ready
        if self._vmm is not None:
            self.record_state(self._backend_name)

    async def confirm_started(self, what: str, log: Path) -> None:
        """Fail with the VMM's own words if it exited right away (bad arguments, no KVM)."""
        await asyncio.sleep(0.05)
        if self._vmm is not None and (rc := self._vmm.poll()) is not None:
            text = log.read_text(errors="replace").strip() if log.exists() else ""
            raise VmError(f"{what} exited at once ({rc}): {text[-1000:]}")

    def _check_running(self) -> None:
        if self.poll() is not None:
            raise ConnectionRefusedError(f"VM {self.id} has exited ({self._status})")

    def close_now(self) -> None:
        """Kill what is left (VMM first), reap it, remove the runtime dir. Blocking: the
        body of ``close()``, and what runs at interpreter exit."""
        _open_vms.discard(self)
        if self._vmm is not None:
            stop_processes((self._vmm,))
            self._status, self._vmm = self._vmm.returncode, None
        self._stop_helpers()
        self._helpers = []
        console.unwatch(self.console_log)
        self.rt.remove()

    async def close(self) -> None:
        await asyncio.to_thread(self.close_now)
