"""What the guest agent does as PID 1 of the VM, apart from serving the host.

Mount the filesystems Python needs and bring up loopback (``setup_system``), log to the
console, power the VM off, reap every zombie (``Reaper``; the kernel's exit is one of
them), and, for a clone restored from a saved VM, what it must not share with its siblings
(``fresh_start``: entropy, wall clock, shares). Stdlib only, like the agent (``agent.py``).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys
import threading
import time

TYPE_CHECKING = False  # typing is not imported at run time: the guest's start stays lean
if TYPE_CHECKING:
    from .agent import Agent

# PID 1 ignores these so a stray signal (or a cell's os.kill(1, ...)) cannot take the VM
# down; the kernel's own process gets default handling back at spawn.
GUARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

_libc = ctypes.CDLL(None, use_errno=True)


def log(msg: str) -> None:
    try:
        with open("/dev/console", "w") as con:
            con.write(f"smol-agent: {msg}\n")
    except OSError:
        sys.stderr.write(f"smol-agent: {msg}\n")


# ---------------------------------------------------------------- system setup


def _mounted() -> set[str]:
    try:
        with open("/proc/self/mounts") as f:
            return {line.split()[1] for line in f}
    except OSError:
        return set()


def _mount(src: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if _libc.mount(src.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        log(f"mount {fstype} on {target} failed: {os.strerror(err)}")


MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
CGROUP_ROOT = "/sys/fs/cgroup"


def setup_system() -> None:
    if "/proc" not in _mounted():
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    have = _mounted()
    wanted = [
        ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
        ("cgroup2", CGROUP_ROOT, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ]
    for src, target, fstype, flags, data in wanted:
        if target not in have:
            _mount(src, target, fstype, flags, data)
    try:
        socket.sethostname("smolvm")
    except OSError:
        pass
    _loopback_up()


def _loopback_up() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def power_off() -> None:
    log("powering off")
    os.sync()
    RB_POWER_OFF, RB_AUTOBOOT = 0x4321FEDC, 0x01234567
    if os.getpid() == 1:
        _libc.reboot(RB_POWER_OFF)
        _libc.reboot(RB_AUTOBOOT)  # with -no-reboot / reboot=t the VMM exits either way
    os._exit(0)


# ---------------------------------------------------------------- a restored clone


RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def fresh_start(req: dict) -> None:
    """What a clone of a saved VM must not share with its siblings, from the claim:
    entropy mixed into the kernel's pool and the CRNG reseeded from it (clones restored
    from one template would otherwise give the same random numbers), the wall clock (it
    stopped when the template was saved), and the shares to mount (9p cannot be mounted
    in a VM that is saved)."""
    import base64

    if entropy := req.get("entropy"):
        seed = base64.b64decode(str(entropy))
        fd = os.open("/dev/urandom", os.O_WRONLY)
        try:
            os.write(fd, seed)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
    if isinstance(clock := req.get("wall_clock"), (int, float)):
        try:
            time.clock_settime(time.CLOCK_REALTIME, float(clock))
        except OSError as e:
            log(f"cannot set the clock: {e}")
    for share in req.get("shares") or []:
        tag, path, mode = str(share["tag"]), str(share["path"]), str(share["mode"])
        os.makedirs(path, exist_ok=True)
        opts = f"{'ro' if mode == 'ro' else 'rw'},trans=virtio,version=9p2000.L,msize=262144"
        _mount(tag, path, "9p", MS_NOSUID | MS_NODEV, opts + ",cache=mmap")
        if path not in _mounted():
            raise OSError(f"could not mount share {tag} on {path}")


# ---------------------------------------------------------------- reaping


class Reaper:
    """PID 1 must reap every orphan; the kernel's exit is one of them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._children = threading.Event()
        # Held while spawning: a child that exits at once is looked up after its pid is known.
        self.spawning = threading.Condition()
        self._watched: dict[int, int | None] = {}  # command pid -> exit code once reaped

    def wake(self) -> None:
        self._children.set()

    def spawn_watched(self, argv: list[str], env: dict[str, str], file_actions: list) -> int:
        """Spawn a command in its own session; ``wait_child`` gets its exit code."""
        with self.spawning:
            pid = os.posix_spawn(argv[0], argv, env, file_actions=file_actions, setsid=True,
                                 setsigdef=GUARDED_SIGNALS)  # fmt: skip
            self._watched[pid] = None
        self.wake()
        return pid

    def wait_child(self, pid: int, timeout: float) -> int | None:
        with self.spawning:
            self.spawning.wait_for(lambda: self._watched.get(pid) is not None, timeout)
            status = self._watched.get(pid)
            if status is not None:
                del self._watched[pid]
            return status

    def run(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self._children.clear()
                self._children.wait(1.0)
                continue
            with self.spawning:
                if pid in self._watched:
                    self._watched[pid] = os.waitstatus_to_exitcode(status)
                    self.spawning.notify_all()
                    continue
            kernel = self.agent.kernel
            if pid == kernel.pid:
                kernel.exited(os.waitstatus_to_exitcode(status))
                self.agent.kernel_gone()
