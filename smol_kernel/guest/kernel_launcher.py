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

import json
import os
import select
import sys
import threading

CLAIM_FD, STATUS_FD = 3, 4  # protocol.LAUNCHER_CLAIM_FD / LAUNCHER_STATUS_FD
MAX_STREAM_MESSAGE = 1 << 20  # characters of stdout/stderr per IOPub stream message


def _status(word: str) -> None:
    os.write(STATUS_FD, word.encode() + b"\n")


def _read_claim() -> dict | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(CLAIM_FD, 65536)
        if not chunk:
            return None
        data += chunk
    os.close(CLAIM_FD)
    claim = json.loads(data)
    return claim if isinstance(claim, dict) else None


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

    from tornado.ioloop import IOLoop

    loop = IOLoop.current()  # the loop app.start() runs
    cold = bool(select.select([CLAIM_FD], [], [], 0)[0])
    threading.Thread(target=_claim_when_ready, args=(app, loop, cold), daemon=True).start()
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


def _claim_when_ready(app, loop, cold: bool) -> None:
    if not cold:
        try:
            _warm_up(app)
        except Exception as e:  # slower first requests, nothing worse
            sys.__stderr__.write(f"smol-kernel launcher: warm-up failed: {e}\n")
        _status("prepared")
    claim = _read_claim()
    if claim is None:
        os._exit(0)
    loop.add_callback(_apply_claim, app, claim)


def _apply_claim(app, claim: dict) -> None:
    """On the kernel's loop: nothing is handled between the key switch and ``started``."""
    session = app.session
    if claim.get("signature_scheme"):
        session.signature_scheme = str(claim["signature_scheme"])
    session.key = str(claim.get("key", "")).encode()
    os.environ.update({str(k): str(v) for k, v in (claim.get("env") or {}).items()})
    _fresh_state(session)
    _status("started")
    os.close(STATUS_FD)


def _fresh_state(session) -> None:
    """A kernel prepared in a VM that was saved and cloned shares its interpreter's state
    with every sibling: reseed what draws from it (the agent reseeded the guest's CRNG
    first), and take a session id of its own."""
    import random
    import uuid

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "big"))
    session.session = str(uuid.uuid4())


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
