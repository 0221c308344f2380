"""The one kernel process of the VM, as the guest agent runs it (``Kernel``).

Start it (through ``kernel_launcher.py`` for an ipykernel argv: prepared, then claimed) in
its own session and its own ``pids.max`` cgroup, write the guest connection file, talk to the
launcher over its pipes (claim, resume, finish, replies to magics' requests), copy its output
to the console (up to a budget) and keep a tail for ``kernel_exited``, signal it, and report
its exit. Stdlib only, like the agent (``agent.py``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

try:  # in the host package (tests, linting)
    from . import protocol as P
    from .pid1 import CGROUP_ROOT, GUARDED_SIGNALS, log
except ImportError:  # in the guest: these modules sit next to this file
    import protocol as P  # type: ignore[no-redef]
    from pid1 import CGROUP_ROOT, GUARDED_SIGNALS, log  # type: ignore[no-redef]

TYPE_CHECKING = False  # typing is not imported at run time: the guest's start stays lean
if TYPE_CHECKING:
    from .agent import Agent

DEFAULT_ENV = {"PATH": P.GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
CONSOLE_BUDGET = 64 * 1024  # kernel stdout/stderr copied to the serial console, at most
TAIL_BYTES = 8 * 1024  # kept for the kernel_exited event
KERNEL_CGROUP = CGROUP_ROOT + "/kernel"


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


def _which(name: str, path: str) -> str:
    for d in (path or P.GUEST_PATH).split(":"):
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(f"{name!r} not found on PATH {path!r}")
