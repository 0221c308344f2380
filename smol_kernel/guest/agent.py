"""smol-kernel guest agent: PID 1 inside every kernel VM.

Stdlib only; shares nothing with the host code but ``protocol.py`` (copied next to this file
in the guest image, with the agent's other modules: ``GUEST_FILES`` in
``image/build_steps.py``). It runs under our initramfs (after ``switch_root``) and under
libkrun's init alike, so it mounts whatever is not mounted yet.

Duties: mount the filesystems Python needs, bring up loopback, reap every zombie and power
the VM off (``pid1.py``), serve the host's streams (QEMU: multiplexed over one virtio-serial
port, ``mux.py``; libkrun: vsock listeners; the ready line on the console is the readiness
signal), start / signal / stop ipykernel on request (``kernel_process.py``), forward each
channel stream to the kernel's loopback port, serve file and command requests
(``sandbox_ops.py``), and power the VM off when asked or when the kernel has exited.

This module holds the control connection (requests and their replies, events to the host),
the stream bridges and the main loop.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

try:  # in the host package (tests, linting)
    from . import mux
    from . import protocol as P
    from . import sandbox_ops as ops
    from .kernel_process import Kernel
    from .pid1 import GUARDED_SIGNALS, Reaper, fresh_start, log, power_off, setup_system
except ImportError:  # in the guest: these modules sit next to this file
    import mux  # type: ignore[no-redef]
    import protocol as P  # type: ignore[no-redef]
    import sandbox_ops as ops  # type: ignore[no-redef]
    from kernel_process import Kernel  # type: ignore[no-redef]
    from pid1 import (  # type: ignore[no-redef]
        GUARDED_SIGNALS,
        Reaper,
        fresh_start,
        log,
        power_off,
        setup_system,
    )

AGENT_VERSION = "0.1.0"
_BOOT_T0 = time.monotonic()


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
