"""smol-kernel guest agent: PID 1 inside every kernel VM.

Stdlib only; shares nothing with the host code but ``protocol.py`` (copied next to this file
in the guest image). It runs under our initramfs (after ``switch_root``) and under libkrun's
init alike, so it mounts whatever is not mounted yet.

Duties: mount the filesystems Python needs, bring up loopback, serve the host's streams (QEMU:
multiplexed over one virtio-serial port, ``mux.py``; libkrun: vsock listeners; the ready line
on the console is the readiness signal), start / signal / stop ipykernel on
request, forward each channel stream to the kernel's loopback port, serve file and command
requests (``sandbox_ops.py``), reap every zombie (it is PID 1), and power the VM off when
asked or when the kernel has exited.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

try:  # in the host package (tests, linting)
    from . import mux
    from . import protocol as P
    from . import sandbox_ops as ops
except ImportError:  # in the guest: protocol.py sits next to this file
    import mux  # type: ignore[no-redef]
    import protocol as P  # type: ignore[no-redef]
    import sandbox_ops as ops  # type: ignore[no-redef]

AGENT_VERSION = "0.1.0"
DEFAULT_ENV = {"PATH": P.GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
CONSOLE_BUDGET = 64 * 1024  # kernel stdout/stderr copied to the serial console, at most
TAIL_BYTES = 8 * 1024  # kept for the kernel_exited event

# PID 1 ignores these so a stray signal (or a cell's os.kill(1, ...)) cannot take the VM
# down; the kernel's own process gets default handling back at spawn.
GUARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

_libc = ctypes.CDLL(None, use_errno=True)
_BOOT_T0 = time.monotonic()


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
KERNEL_CGROUP = CGROUP_ROOT + "/kernel"


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


# ---------------------------------------------------------------- the kernel process


def kernel_cgroup(max_processes: int) -> str | None:
    """A cgroup for the kernel and everything it starts, capped at ``max_processes`` tasks
    (0: no cap), so a fork bomb meets EAGAIN instead of exhausting the guest's memory and
    threads (which would starve this agent). Root in the guest can leave it: it keeps the
    guest usable, the VM is what keeps the host safe. None if cgroup2 is unavailable."""
    try:
        with open(CGROUP_ROOT + "/cgroup.subtree_control", "w") as f:
            f.write("+pids")
        os.makedirs(KERNEL_CGROUP, exist_ok=True)
        with open(KERNEL_CGROUP + "/pids.max", "w") as f:
            f.write(str(max_processes) if max_processes > 0 else "max")
    except OSError as e:
        log(f"no process limit for the kernel (cgroup2 pids): {e}")
        return None
    return KERNEL_CGROUP


class Kernel:
    """The one kernel process of this VM."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.pid: int | None = None
        self.exit_status: int | None = None
        self._tail = bytearray()
        self._console_left = CONSOLE_BUDGET
        self._claim_w: int | None = None  # the launcher's claim pipe: the host's lines to it
        self.claimed = False
        self._pipe_lock = threading.Lock()
        self._said: dict[str, threading.Event] = {}  # status word -> seen since asked
        self.cwd = "/root"
        self.cgroup: str | None = None
        self.env = dict(DEFAULT_ENV)  # what commands run with: the kernel's environment

    def start(
        self, argv: list[str], env: dict[str, str], cwd: str, connection: dict,
        max_processes: int = 0, prepare: bool = False, debugger: bool = False,
    ) -> int:  # fmt: skip
        """Start the kernel. An ipykernel argv goes through the two-step launcher: with
        ``prepare`` it waits for ``claim``, else it is claimed with ``connection`` at once."""
        if self.pid is not None:
            raise RuntimeError("a kernel is already running in this VM")
        if not argv:
            raise ValueError("empty kernel argv")
        launcher = P.two_step_argv(argv, debugger)
        if prepare and launcher is None:
            raise ValueError(f"this kernel cannot be prepared ahead: {argv[:3]}")
        self._write_connection(connection if not prepare else {"key": os.urandom(16).hex()})
        self.cwd, self.env = cwd, dict(env)
        argv = launcher or argv
        argv = [a.replace("{connection_file}", P.GUEST_CONNECTION_FILE) for a in argv]
        os.makedirs(cwd, exist_ok=True)
        rfd, wfd = os.pipe()
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, wfd, 1),
            (os.POSIX_SPAWN_DUP2, wfd, 2),
            (os.POSIX_SPAWN_CLOSE, rfd),
        ]
        if launcher is not None:
            claim_r, self._claim_w = os.pipe()
            status_r, status_w = os.pipe()
            actions += [
                (os.POSIX_SPAWN_DUP2, claim_r, P.LAUNCHER_CLAIM_FD),
                (os.POSIX_SPAWN_DUP2, status_w, P.LAUNCHER_STATUS_FD),
            ]
        prog = argv[0] if "/" in argv[0] else _which(argv[0], env.get("PATH", ""))
        shown = " ".join(argv)
        if cgroup := kernel_cgroup(max_processes):
            self.cgroup = cgroup
            # The kernel enters its cgroup before it runs a line (no fork can slip past).
            script = f'echo 0 > {cgroup}/cgroup.procs && exec "$0" "$@"'
            prog, argv = "/bin/sh", ["/bin/sh", "-c", script, prog, *argv[1:]]
        old_cwd = os.getcwd()
        os.chdir(cwd)  # posix_spawn has no cwd argument before 3.13
        try:
            with self.agent.reaper.spawning:  # reaped only once self.pid says whose it is
                self.pid = os.posix_spawn(
                    prog,
                    argv,
                    env,
                    file_actions=actions,
                    setsid=True,
                    setsigdef=GUARDED_SIGNALS,  # the kernel must get SIGINT (interrupts) again
                )
        finally:
            os.chdir(old_cwd)
            os.close(wfd)
            if launcher is not None:
                os.close(claim_r)
                os.close(status_w)
        log(f"kernel started, pid {self.pid}: {shown}")
        threading.Thread(target=self._copy_output, args=(rfd,), daemon=True).start()
        if launcher is None:
            threading.Thread(target=self._watch_ready, daemon=True).start()
        else:
            threading.Thread(target=self._watch_status, args=(status_r,), daemon=True).start()
            if not prepare:
                self.claim(connection, {})
        self.agent.reaper.wake()
        return self.pid

    def state(self) -> str:
        """none, prepared (waiting for its claim: a restored clone), running or exited."""
        if self.pid is None:
            return "none"
        if self.exit_status is not None:
            return "exited"
        return "prepared" if self._claim_w is not None and not self.claimed else "running"

    def _write_connection(self, connection: dict) -> None:
        os.makedirs(os.path.dirname(P.GUEST_CONNECTION_FILE), exist_ok=True)
        info = dict(connection)
        info.update({"ip": "127.0.0.1", "transport": "tcp"})
        info.update({f"{ch}_port": port for ch, port in P.KERNEL_PORTS.items()})
        tmp = P.GUEST_CONNECTION_FILE + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.rename(tmp, P.GUEST_CONNECTION_FILE)

    def claim(self, connection: dict, env: dict[str, str]) -> None:
        """Give a prepared kernel its key (and the per-kernel environment). Once only."""
        if self._claim_w is None or self.claimed:
            raise RuntimeError("no prepared kernel is waiting in this VM")
        if self.exit_status is not None:
            raise ProcessLookupError(f"the kernel exited with status {self.exit_status}")
        self._write_connection(connection)  # what %connect_info shows
        self.env.update(env)
        self.claimed = True
        self.tell({
            "key": connection.get("key", ""),
            "signature_scheme": connection.get("signature_scheme", ""),
            "env": env,
        })  # fmt: skip

    def tell(self, msg: dict) -> None:
        """One line to the launcher (the claim, then replies and resumes)."""
        if self._claim_w is None or self.exit_status is not None:
            raise ProcessLookupError("the kernel is not running under the launcher")
        data = json.dumps(msg).encode() + b"\n"
        with self._pipe_lock:
            view = memoryview(data)
            while view:  # the launcher always reads: a long line only waits for it
                view = view[os.write(self._claim_w, view) :]

    def tell_and_wait(self, msg: dict, word: str, timeout: float) -> None:
        """Send ``msg`` and wait for the launcher to say ``word`` (TimeoutError)."""
        seen = self._said[word] = threading.Event()
        self.tell(msg)
        if not seen.wait(timeout):
            raise TimeoutError(f"the kernel did not say {word!r} within {timeout:.0f}s")

    def resume(self, req: dict) -> None:
        """A kernel restored from a checkpoint: its key and environment (a fork's are new),
        and, for a fork, reseeded random state; see kernel_launcher.HostLink."""
        connection = req.get("connection")
        env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
        msg: dict = {"type": "resume", "reseed": bool(req.get("reseed")), "env": env}
        if isinstance(connection, dict):
            self._write_connection(connection)
            msg["key"] = str(connection.get("key", ""))
            msg["signature_scheme"] = str(connection.get("signature_scheme", ""))
        self.env.update(msg["env"])
        self.tell_and_wait(msg, "resumed", float(req.get("timeout") or 30))

    def _watch_status(self, status_r: int) -> None:
        events = {b"prepared": P.EV_KERNEL_PREPARED, b"started": P.EV_KERNEL_READY}
        with os.fdopen(status_r, "rb") as pipe:
            while line := pipe.readline(P.MAX_KERNEL_REQUEST):
                if not line.endswith(b"\n"):  # over the cap: skip the rest of that line
                    while (more := pipe.readline(P.MAX_KERNEL_REQUEST)) and not more.endswith(
                        b"\n"
                    ):
                        pass
                    continue
                word = line.strip()
                if self.exit_status is not None:
                    continue
                if event := events.get(word):
                    self.agent.broadcast({"event": event, "pid": self.pid})
                elif word.startswith(b"{"):
                    self._forward_request(word)
                elif (seen := self._said.pop(word.decode("ascii", "replace"), None)) is not None:
                    seen.set()

    def _forward_request(self, line: bytes) -> None:
        """A magic's request (``%checkpoint`` ...) goes to the host, which decides."""
        try:
            req = json.loads(line)
        except ValueError:
            return
        if isinstance(req, dict) and isinstance(req.get("rid"), int):
            self.agent.broadcast({"event": P.EV_KERNEL_REQUEST, "request": req})

    def _copy_output(self, rfd: int) -> None:
        with os.fdopen(rfd, "rb", buffering=0) as pipe:
            while data := pipe.read(65536):
                self._tail += data
                del self._tail[:-TAIL_BYTES]
                if self._console_left > 0:
                    chunk = data[: self._console_left]
                    self._console_left -= len(chunk)
                    try:
                        with open("/dev/console", "wb") as con:
                            con.write(chunk)
                            if self._console_left <= 0:
                                con.write(b"\n[smol-agent: further kernel output not logged]\n")
                    except OSError:
                        pass

    def _watch_ready(self) -> None:
        pending = dict(P.KERNEL_PORTS)
        while pending and self.exit_status is None:
            for ch, port in list(pending.items()):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        del pending[ch]
            if pending:
                time.sleep(0.05)
        if not pending and self.exit_status is None:
            self.agent.broadcast({"event": P.EV_KERNEL_READY, "pid": self.pid})

    def signal(self, signum: int) -> None:
        if self.pid is None or self.exit_status is not None:
            raise ProcessLookupError("no kernel is running")
        try:
            os.killpg(self.pid, signum)  # the kernel leads its own session/process group
        except ProcessLookupError:
            os.kill(self.pid, signum)

    def exited(self, status: int) -> None:
        self.exit_status = status
        time.sleep(0.05)  # let the output thread drain the pipe
        tail = bytes(self._tail).decode("utf-8", "replace")
        log(f"kernel exited with status {status}")
        self.agent.broadcast({"event": P.EV_KERNEL_EXITED, "status": status, "tail": tail})


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


def _which(name: str, path: str) -> str:
    for d in (path or P.GUEST_PATH).split(":"):
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(f"{name!r} not found on PATH {path!r}")


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


# ---------------------------------------------------------------- vsock servers


def _vsock_listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, port))
    s.listen(16)
    return s


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy bytes until EOF; blocking sendall gives backpressure instead of buffering."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _bridge(stream: socket.socket, port: int) -> None:
    try:
        tcp = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        stream.close()
        return
    tcp.settimeout(None)
    t = threading.Thread(target=_pump, args=(tcp, stream), daemon=True)
    t.start()
    _pump(stream, tcp)
    t.join()
    stream.close()
    tcp.close()


class Agent:
    def __init__(self) -> None:
        self.kernel = Kernel(self)
        self.reaper = Reaper(self)
        self._controls: list[socket.socket] = []
        self._lock = threading.Lock()

    # -- control
    def broadcast(self, msg: dict) -> None:
        data = P.encode(msg)
        with self._lock:
            for conn in list(self._controls):
                try:
                    conn.sendall(data)
                except OSError:
                    self._controls.remove(conn)

    def _reply(self, conn: socket.socket, req: dict, **fields) -> None:
        msg = {"id": req.get("id"), "ok": True, **fields}
        with self._lock:
            conn.sendall(P.encode(msg))

    def _error(self, conn: socket.socket, req: dict, error: str, errno: int | None = None) -> None:
        msg = {"id": req.get("id"), "ok": False, "error": error}
        if errno is not None:
            msg["errno"] = errno
        with self._lock:
            conn.sendall(P.encode(msg))

    def _fail(self, conn: socket.socket, req: dict, e: Exception) -> None:
        errno = e.errno if isinstance(e, OSError) else None
        self._error(conn, req, f"{type(e).__name__}: {e}", errno)

    def _run_command(self, conn: socket.socket, req: dict) -> None:
        """In its own thread: a long command must not hold up the requests behind it."""
        try:
            env = {**self.kernel.env, **{str(k): str(v) for k, v in (req.get("env") or {}).items()}}
            cwd = ops.resolve(str(req.get("cwd") or "."), self.kernel.cwd)
            # The shell enters the folder and the kernel's cgroup (its process cap) first.
            script = 'cd -- "$0" || exit 126; '
            if self.kernel.cgroup:
                script += f"echo 0 > {self.kernel.cgroup}/cgroup.procs; "
            script += 'exec /bin/sh -c "$1"'
            argv = ["/bin/sh", "-c", script, cwd, str(req["command"])]
            reply = ops.run_command(
                argv, env, float(req.get("time_limit") or 60),
                self.reaper.spawn_watched, self.reaper.wait_child,
            )  # fmt: skip
            self._reply(conn, req, **reply)
        except Exception as e:
            try:
                self._fail(conn, req, e)
            except OSError:
                pass

    def handle(self, conn: socket.socket, req: dict) -> None:
        op = req.get("op")
        if op == P.OP_HELLO:
            self._reply(
                conn,
                req,
                protocol=P.PROTOCOL_VERSION,
                agent_version=AGENT_VERSION,
                kernel_release=os.uname().release,
                uptime=_uptime(),
                agent_seconds=time.monotonic() - _BOOT_T0,
                pid=os.getpid(),
                kernel=self.kernel.state(),
            )
        elif op == P.OP_PING:
            self._reply(conn, req)
        elif op == P.OP_START_KERNEL:
            env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
            pid = self.kernel.start(
                list(req["argv"]),
                env,
                str(req.get("cwd") or "/root"),
                dict(req.get("connection") or {}),
                int(req.get("max_processes") or 0),
                prepare=bool(req.get("prepare")),
                debugger=bool(req.get("debugger")),
            )
            self._reply(conn, req, pid=pid)
        elif op == P.OP_CLAIM_KERNEL:
            env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
            fresh_start(req)  # a restored clone: its own entropy, clock and shares first
            self.kernel.claim(dict(req["connection"]), env)
            self._reply(conn, req)
        elif op == P.OP_SIGNAL:
            self.kernel.signal(int(req["signum"]))
            self._reply(conn, req)
        elif op == P.OP_KERNEL_REPLY:
            self.kernel.tell({"type": "reply", "rid": int(req["rid"]), "ok": bool(req.get("ok")),
                              "text": str(req.get("text", ""))})  # fmt: skip
            self._reply(conn, req)
        elif op == P.OP_RESUME:
            fresh_start(req)  # entropy and clock first: the kernel may draw at once
            self.kernel.resume(req)
            self._reply(conn, req)
        elif op == P.OP_FINISH:
            self.kernel.tell_and_wait(
                {"type": "finish", "announce": str(req.get("announce", "")),
                 "parent": req.get("parent"), "ident": req.get("ident")},
                "finished", float(req.get("timeout") or 30),
            )  # fmt: skip
            self._reply(conn, req)
        elif op == P.OP_POWEROFF:
            self._reply(conn, req)
            power_off()
        elif op == P.OP_WRITE_FILE:
            path = ops.resolve(req.get("path"), self.kernel.cwd)
            self._reply(conn, req, **ops.write_file(path, str(req.get("data", "")),
                                                    bool(req.get("append"))))  # fmt: skip
        elif op == P.OP_READ_FILE:
            path = ops.resolve(req.get("path"), self.kernel.cwd)
            reply = ops.read_file(path, int(req.get("offset") or 0), int(req.get("length") or 0))
            self._reply(conn, req, **reply)
        elif op == P.OP_LIST_FILES:
            self._reply(conn, req, **ops.list_files(ops.resolve(req.get("path"), self.kernel.cwd)))
        elif op == P.OP_REMOVE_FILE:
            self._reply(conn, req, **ops.remove_file(ops.resolve(req.get("path"), self.kernel.cwd)))
        elif op == P.OP_RUN_COMMAND:
            threading.Thread(target=self._run_command, args=(conn, req), daemon=True).start()
        else:
            self._error(conn, req, f"unknown op {op!r}")

    def serve_control(self, conn: socket.socket) -> None:
        with self._lock:
            self._controls.append(conn)
        buf = b""
        try:
            while chunk := conn.recv(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    req: dict = {}
                    try:
                        req = P.decode(line)
                        self.handle(conn, req)
                    except Exception as e:  # report, never die: we are PID 1
                        self._fail(conn, req, e)
                if len(buf) > P.MAX_LINE:
                    raise P.ProtocolError("control line too long")
        except OSError:
            pass
        finally:
            with self._lock:
                if conn in self._controls:
                    self._controls.remove(conn)
            conn.close()

    def kernel_gone(self) -> None:
        """One VM per kernel: when the kernel is gone, so is the VM."""
        time.sleep(0.2)  # let the host read kernel_exited
        power_off()

    # -- main
    def run(self) -> None:
        if os.getpid() == 1:
            for sig in GUARDED_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        setup_system()
        threading.Thread(target=self.reaper.run, daemon=True).start()
        port = mux.open_port()
        if port is not None:  # QEMU: one virtio-serial port carries every stream
            channel = mux.GuestMux(port, self._mux_connect)
            log(f"ready after {_uptime():.2f}s of guest uptime (serial port)")  # READY_LINE
            channel.serve()
            return
        for ch, vport in P.CHANNEL_PORTS.items():
            lsock = _vsock_listener(vport)
            kport = P.KERNEL_PORTS[ch]
            threading.Thread(target=_accept_loop, args=(lsock, _bridge, kport), daemon=True).start()
        control = _vsock_listener(P.CONTROL_PORT)
        log(f"ready after {_uptime():.2f}s of guest uptime (vsock)")  # protocol.READY_LINE
        _accept_loop(control, lambda conn: self.serve_control(conn))

    def _mux_connect(self, port: int) -> socket.socket | None:
        """The local end of a stream the host opened: the control handler, or the
        kernel's port on guest loopback (None: nobody there)."""
        if port == P.CONTROL_PORT:
            ours, theirs = socket.socketpair()
            threading.Thread(target=self.serve_control, args=(ours,), daemon=True).start()
            return theirs
        channel = next((ch for ch, p in P.CHANNEL_PORTS.items() if p == port), None)
        if channel is None:
            return None
        try:
            sock = socket.create_connection(("127.0.0.1", P.KERNEL_PORTS[channel]), timeout=5)
        except OSError:
            return None
        sock.settimeout(None)
        return sock


def _accept_loop(lsock: socket.socket, handler, *args) -> None:
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=handler, args=(conn, *args), daemon=True).start()


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return -1.0


def main() -> None:
    try:
        Agent().run()
    except BaseException as e:  # as PID 1, dying panics the kernel: say why first
        log(f"fatal: {type(e).__name__}: {e}")
        power_off()


if __name__ == "__main__":
    main()
