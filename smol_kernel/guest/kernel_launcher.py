"""Starts ipykernel in two steps, so a VM can hold a kernel that is ready but for its key.

Run by the guest agent in place of ``PYTHON -m ipykernel_launcher ARGS`` as
``PYTHON kernel_launcher.py [--debugger] -m MODULE ARGS``:

1. Import ipykernel and initialise the kernel app exactly as ``-m MODULE ARGS`` would (the
   connection file the agent wrote holds the fixed guest ports and a throw-away key), and
   start serving. Unless the claim is already waiting (a cold start), warm up: a client on
   guest loopback sends kernel_info, a silent execute and a completion under the throw-away
   key, and a traceback is formatted, so the real client's first requests (and first error)
   do not pay for code that runs for the first time (under emulation QEMU translates each
   new code path once, ~0.3 s for the first kernel_info, ~3 s for the first traceback).
   Then write ``prepared`` on the status pipe.
2. Block on the claim pipe for one JSON line: ``{"key", "signature_scheme", "env"}``. The
   kernel's loop switches to the real key and adds the per-kernel environment, then writes
   ``started``. EOF instead of a line: the VM is being discarded, exit quietly.
3. Keep both pipes as the kernel's line to the host (``HostLink``): the magics
   ``%checkpoint``, ``%rewind`` and ``%checkpoints`` write a request on the status pipe and
   wait for the host's reply on the claim pipe, where the host also sends, to a kernel
   restored from a checkpoint, ``resume`` (drop requests of the saved past, take a key and
   environment, reseed for a fork: then ``resumed``) and ``finish`` (say which checkpoint it
   is at, and answer the cell that asked for the rewind: then ``finished``).

A checkpoint taken by ``%checkpoint`` holds the kernel inside that magic, waiting for its
reply; restored, it gets ``resume`` instead and continues the cell as the one that asked
for the rewind (its reply, output and idle status go to that request: the parent message
and routing identity are changed in place, so ipykernel's own reply is the right one).
A checkpoint taken by the host holds an idle kernel, and the loop answers instead.

ipykernel 6 ends the "abort queued cells after an error" window with ``call_later(0)``:
under emulation the client's next request, sent after it got the error's reply, can be
read in the same loop turn and is aborted too. ipykernel 7 ends the window at once; so do
we (``_end_abort_window_at_once``).

ipykernel sends whatever a cell printed since the last flush as one stream message, and
under emulation its IOPub thread flushes rarely while a loop prints: 50 MB of prints left
as two 25 MB messages, which every client must hold whole. Stream messages are capped at
``MAX_STREAM_MESSAGE`` characters instead (``_bound_stream_messages``): a long write is
split, and a full buffer is flushed before the cell goes on.

Lean start: ipykernel 6 imports debugpy (~1 s under emulation) even when no client ever
debugs; unless ``--debugger`` is given it is hidden, and the kernel reports no debugger.

Guest side only: stdlib and the guest's ipykernel, nothing from the host package.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import select
import sys
import threading
import uuid

CLAIM_FD, STATUS_FD = 3, 4  # protocol.LAUNCHER_CLAIM_FD / LAUNCHER_STATUS_FD
MAX_STREAM_MESSAGE = 1 << 20  # characters of stdout/stderr per IOPub stream message
ASK_TIMEOUT = 600.0  # seconds a magic waits for the host (a checkpoint of a big VM)
_status_lock = threading.Lock()


def _status(word: str) -> None:
    with _status_lock:  # a line is written whole (pipe writes under PIPE_BUF are atomic)
        os.write(STATUS_FD, word.encode() + b"\n")


def _lines(fd: int):
    """JSON objects, one per line, until EOF."""
    buf = b""
    while chunk := os.read(fd, 65536):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                yield msg


def main(args: list[str]) -> None:
    debugger = False
    while args and args[0] != "-m":
        if args.pop(0) == "--debugger":
            debugger = True
    module, kernel_args = args[1], args[2:]
    sys.path[0] = os.getcwd()  # where ``python -m`` puts the working folder, not our folder
    if not debugger:
        sys.modules["debugpy"] = None  # type: ignore[assignment]  # -> ImportError
    from importlib.util import find_spec

    from ipykernel.kernelapp import IPKernelApp

    spec = find_spec(module)
    sys.argv = [spec.origin if spec and spec.origin else module, *kernel_args]
    app = IPKernelApp.instance()
    app.initialize(kernel_args)
    _end_abort_window_at_once(app.kernel)
    _bound_stream_messages()
    link = HostLink(app)
    link.register_magics()

    from tornado.ioloop import IOLoop

    loop = IOLoop.current()  # the loop app.start() runs
    cold = bool(select.select([CLAIM_FD], [], [], 0)[0])
    threading.Thread(target=_claim_when_ready, args=(app, loop, cold, link), daemon=True).start()
    app.start()


def _end_abort_window_at_once(kernel) -> None:
    """After an error, abort the requests already received, not ones read a moment later."""
    import ipykernel

    if ipykernel.version_info[0] != 6 or not hasattr(kernel, "schedule_dispatch"):
        return
    original = type(kernel)._abort_queues

    def _abort_queues() -> None:
        if kernel.stop_on_error_timeout:  # an explicit window: ipykernel's own way
            return original(kernel)
        kernel._aborting = True
        kernel.shell_stream.flush()  # what has arrived is queued (and will be aborted) ...

        async def stop_aborting() -> None:
            kernel._aborting = False

        kernel.schedule_dispatch(stop_aborting)  # ... and nothing after it

    kernel._abort_queues = _abort_queues


def _bound_stream_messages() -> None:
    from ipykernel.iostream import OutStream

    if not all(hasattr(OutStream, a) for a in ("write", "flush", "_is_master_process")):
        return
    write = OutStream.write

    def bounded_write(self, string):
        if not isinstance(string, str) or self.pub_thread is None:
            return write(self, string)  # ipykernel's own errors
        for start in range(0, len(string), MAX_STREAM_MESSAGE):
            write(self, string[start : start + MAX_STREAM_MESSAGE])
            buffer = getattr(self, "_buffer", None)
            full = buffer is not None and buffer.tell() >= MAX_STREAM_MESSAGE
            if full and self._is_master_process():
                self.flush()  # waits for the IOPub thread: the cell cannot outrun it
        return len(string)

    OutStream.write = bounded_write


def _claim_when_ready(app, loop, cold: bool, link: HostLink) -> None:
    if not cold:
        try:
            _warm_up(app)
        except Exception as e:  # slower first requests, nothing worse
            sys.__stderr__.write(f"smol-kernel launcher: warm-up failed: {e}\n")
        _PREPARED_GENERATORS[:] = _generators()  # what every clone of this VM will share
        _status("prepared")
    lines = _lines(CLAIM_FD)
    claim = next(lines, None)
    if claim is None:
        os._exit(0)
    loop.add_callback(_apply_claim, app, claim)
    link.serve(lines, loop)


def _apply_claim(app, claim: dict) -> None:
    """On the kernel's loop: nothing is handled between the key switch and ``started``."""
    _take_key(app, claim)
    _fresh_state(app.session)
    _status("started")


def _take_key(app, msg: dict) -> None:
    session = app.session
    if msg.get("signature_scheme"):
        session.signature_scheme = str(msg["signature_scheme"])
    if "key" in msg:
        session.key = str(msg.get("key", "")).encode()
    os.environ.update({str(k): str(v) for k, v in (msg.get("env") or {}).items()})


_PREPARED_GENERATORS: list = []  # every generator alive when the kernel was prepared


def _generators() -> list:
    """Every pseudo-random generator in this interpreter: ``random.Random`` instances (the
    module's own, tempfile's, any a module made at import; not SystemRandom, which reads
    the CRNG), numpy's RandomState and Generator. Found by walking the objects the garbage
    collector tracks, so none is missed for not being on a list."""
    import gc
    import random

    kinds: tuple = (random.Random,)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kinds += (numpy.random.RandomState, numpy.random.Generator)
    return [o for o in gc.get_objects()
            if isinstance(o, kinds) and not isinstance(o, random.SystemRandom)]  # fmt: skip


def _reseed(generator) -> None:
    seed = int.from_bytes(os.urandom(32), "big")
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(generator, numpy.random.Generator):
        bits = generator.bit_generator
        bits.state = type(bits)(seed).state
    elif numpy is not None and isinstance(generator, numpy.random.RandomState):
        generator.seed(seed % (1 << 32))
    else:
        generator.seed(seed)


def _fresh_state(session, walk: bool = False) -> None:
    """A kernel prepared in a VM that was saved and cloned shares its interpreter's state
    with every sibling: reseed every generator that existed when it was prepared (or, with
    ``walk``, that exists now: a fork shares what the user's cells made too) from the
    guest's CRNG (the agent reseeded it first), mix fresh entropy into OpenSSL's generator
    if ssl is loaded, and take a session id of its own."""
    import random

    for generator in _generators() if walk else [*_PREPARED_GENERATORS, random._inst]:
        try:
            _reseed(generator)
        except Exception as e:  # a subclass with a seed() of its own: say so, go on
            sys.__stderr__.write(f"smol-kernel launcher: cannot reseed {type(generator)}: {e}\n")
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        ssl.RAND_add(os.urandom(32), 32.0)
    session.session = str(uuid.uuid4())


class HostLink:
    """The kernel's requests to the host (magics) and the host's messages to the kernel."""

    def __init__(self, app) -> None:
        self.app = app
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, list] = {}  # rid -> [threading.Event, reply]
        self._in_magic: list | None = None  # the slot of a %checkpoint waiting for its reply

    # -- the magics (on the kernel's main thread, inside a cell)
    def register_magics(self) -> None:
        shell = getattr(self.app, "shell", None)
        if shell is None:
            return
        shell.register_magic_function(self.checkpoint_magic, "line", "checkpoint")
        shell.register_magic_function(self.rewind_magic, "line", "rewind")
        shell.register_magic_function(self.checkpoints_magic, "line", "checkpoints")
        shell.register_magic_function(self.pip_magic, "line", "pip")

    def checkpoint_magic(self, line: str) -> None:
        """%checkpoint [NAME]: save this kernel (variables, files, processes) as it is at
        this line; ``%rewind NAME`` comes back here. Put it last in its cell: a rewind
        resumes the cell after it."""
        reply = self._ask("checkpoint", magic=True, name=line.strip() or None)
        if reply.get("type") == "resume":  # restored from the checkpoint this magic took
            then = reply["_then"]
            self._resume_here(reply)
            then[0].wait(ASK_TIMEOUT)
            with self._lock:
                if self._in_magic is then:
                    self._in_magic = None
            self._finish_here(then[1] or {})
            return
        self._show(reply)

    def rewind_magic(self, line: str) -> None:
        """%rewind NAME: bring this kernel back to checkpoint NAME (same kernel, clients
        stay connected); cells sent after this one run there."""
        kernel = self.app.kernel
        parent = kernel.get_parent("shell") if hasattr(kernel, "get_parent") else {}
        ident = getattr(kernel, "_parent_ident", {}).get("shell") or []
        finish = {"header": dict(parent.get("header") or {}),
                  "ident": [base64.b64encode(bytes(getattr(f, "bytes", f))).decode()
                            for f in ident]}  # fmt: skip
        self._show(self._ask("rewind", name=line.strip(), finish=finish))

    def pip_magic(self, line: str) -> None:
        """%pip install NAME ...: the host installs the packages into this VM (binary wheels
        from the server's index, resolved on the host: this kernel has no network to fetch
        them itself). Requirement names only; -q and -U are accepted and change nothing."""
        import importlib
        import shlex

        from IPython.core.error import UsageError

        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise UsageError(f"%pip: {e}") from None
        quiet = ("-q", "--quiet", "-U", "--upgrade")
        words = [w for w in words if w not in quiet]
        if not words or words[0] != "install":
            raise UsageError(
                "in a smolvm kernel %pip installs only: %pip install NAME ... (the host "
                "resolves and fetches binary wheels for this VM, which has no network)"
            )
        self._show(self._ask("install", requirements=words[1:]))
        importlib.invalidate_caches()

    def checkpoints_magic(self, line: str) -> None:
        """%checkpoints: this kernel's checkpoints."""
        self._show(self._ask("checkpoints"))

    @staticmethod
    def _show(reply: dict) -> None:
        if reply.get("ok"):
            print(str(reply.get("text", "")))
        else:
            from IPython.core.error import UsageError

            raise UsageError(str(reply.get("text") or "the host refused"))

    def _ask(self, op: str, magic: bool = False, **fields) -> dict:
        rid = next(self._ids)
        slot = [threading.Event(), None]
        with self._lock:
            self._waiting[rid] = slot
            if magic:
                self._in_magic = slot
        try:
            _status(json.dumps({"request": op, "rid": rid, **fields}, default=str))
            if not slot[0].wait(ASK_TIMEOUT):
                return {"ok": False, "text": f"the host did not answer within {ASK_TIMEOUT:.0f}s"}
            return slot[1] or {}
        finally:
            with self._lock:
                self._waiting.pop(rid, None)
                if self._in_magic is slot:
                    self._in_magic = None

    # -- the host's lines (the reader thread)
    def serve(self, lines, loop) -> None:
        for msg in lines:
            kind = msg.get("type")
            if kind == "reply":
                with self._lock:
                    slot = self._waiting.get(msg.get("rid"))  # type: ignore[arg-type]
                if slot is not None:
                    slot[1] = msg
                    slot[0].set()
            elif kind in ("resume", "finish"):
                with self._lock:
                    slot = self._in_magic
                    if slot is not None and kind == "resume":  # where "finish" will go
                        msg = {**msg, "_then": [threading.Event(), None]}
                        self._in_magic = msg["_then"]
                if slot is not None:  # the main thread is in %checkpoint: it does the work
                    slot[1] = msg
                    slot[0].set()
                elif kind == "resume":
                    loop.add_callback(self._resume_here, msg)
                else:
                    loop.add_callback(self._finish_idle, msg)

    # -- a restored kernel (on the kernel's main thread)
    def _resume_here(self, msg: dict) -> None:
        """Drop what the saved kernel had queued (requests of the past, from connections
        that are gone), take the key and environment, and for a fork reseed."""
        kernel = self.app.kernel
        try:
            kernel.shell_stream.flush()
        except Exception:
            pass
        queue = getattr(kernel, "msg_queue", None)
        while queue is not None:
            try:
                queue.get_nowait()
            except Exception:
                break
        _take_key(self.app, msg)
        if msg.get("reseed"):
            _fresh_state(self.app.session, walk=True)
        _status("resumed")

    def _finish_here(self, msg: dict) -> None:
        """In the %checkpoint that was saved: from here on this cell is the request that
        asked for the rewind (or, asked by the host, nobody's)."""
        kernel = self.app.kernel
        parent = kernel.get_parent("shell")
        ident = kernel._parent_ident["shell"]
        header, routing = _finish_target(msg)
        if isinstance(parent, dict) and isinstance(ident, list):
            parent.clear()
            parent.update({"header": header, "msg_id": header.get("msg_id"),
                           "msg_type": header.get("msg_type"), "parent_header": {},
                           "metadata": {}, "content": {}, "buffers": []})  # fmt: skip
            ident[:] = routing  # nobody (an empty route) when the host asked
            kernel.set_parent(ident, parent, "shell")
        print(str(msg.get("announce", "")), flush=True)
        _status("finished")

    def _finish_idle(self, msg: dict) -> None:
        """A checkpoint of an idle kernel: busy, the line, the reply, idle."""
        kernel = self.app.kernel
        header, routing = _finish_target(msg)
        session = kernel.session
        topic = kernel._topic if hasattr(kernel, "_topic") else (lambda t: t.encode())
        session.send(kernel.iopub_socket, "status", {"execution_state": "busy"}, header,
                     ident=topic("status"))  # fmt: skip
        session.send(kernel.iopub_socket, "stream",
                     {"name": "stdout", "text": str(msg.get("announce", "")) + "\n"}, header,
                     ident=topic("stream"))  # fmt: skip
        if routing and header.get("msg_type") == "execute_request":
            reply = {"status": "ok", "execution_count": kernel.execution_count,
                     "user_expressions": {}, "payload": []}  # fmt: skip
            try:
                session.send(kernel.shell_stream, "execute_reply", reply, header, ident=routing)
            except Exception as e:  # another ipykernel's internals: the cell stays open
                sys.__stderr__.write(f"smol-kernel launcher: no reply to the rewind: {e}\n")
        session.send(kernel.iopub_socket, "status", {"execution_state": "idle"}, header,
                     ident=topic("status"))  # fmt: skip
        _status("finished")


def _finish_target(msg: dict) -> tuple[dict, list[bytes]]:
    """The request a restored kernel answers: its header and routing identity, or a header
    of its own and no route (a rewind the host asked for, or a restart from a crash)."""
    header = msg.get("parent")
    if not isinstance(header, dict) or not header.get("msg_id"):
        header = {"msg_id": f"smol-kernel-{uuid.uuid4().hex}", "msg_type": "rewind",
                  "session": "smol-kernel", "username": "smol-kernel",
                  "version": "5.3"}  # fmt: skip
    routing = []
    for part in msg.get("ident") or []:
        try:
            routing.append(base64.b64decode(str(part)))
        except ValueError:
            return header, []
    return header, routing


def _warm_up(app) -> None:
    import zmq
    from jupyter_client.session import Session

    session = Session(key=app.session.key, signature_scheme=app.session.signature_scheme)
    ctx = zmq.Context()
    try:
        shell = ctx.socket(zmq.DEALER)
        shell.connect(f"tcp://127.0.0.1:{app.shell_port}")
        iopub = ctx.socket(zmq.SUB)
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        iopub.connect(f"tcp://127.0.0.1:{app.iopub_port}")
        execute = {"code": "pass", "silent": True, "store_history": False,  # no count, no
                   "user_expressions": {}, "allow_stdin": False}  # history  # fmt: skip
        for msg_type, content in (
            ("kernel_info_request", {}),
            ("execute_request", execute),
            ("complete_request", {"code": "import o", "cursor_pos": 8}),
        ):
            session.send(shell, msg_type, content)
            if not shell.poll(120_000):
                raise TimeoutError(f"no reply to {msg_type}")
            session.recv(shell)
    finally:
        ctx.destroy(linger=0)
    try:  # a user's first error: IPython's traceback formatter takes ~3 s to warm under TCG
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        app.shell.InteractiveTB.structured_traceback(*sys.exc_info())


if __name__ == "__main__":
    main(sys.argv[1:])
