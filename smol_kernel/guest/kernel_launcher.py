"""Starts ipykernel in two steps, so a VM can hold a kernel that is ready but for its key.

Run by the guest agent in place of ``PYTHON -m ipykernel_launcher ARGS`` as
``PYTHON kernel_launcher.py [--debugger] -m MODULE ARGS``:

1. Import ipykernel and initialise the kernel app exactly as ``-m MODULE ARGS`` would (the
   connection file the agent wrote holds the fixed guest ports and a throw-away key), then
   write ``prepared`` on the status pipe. This is the slow part under emulation.
2. Block on the claim pipe for one JSON line: ``{"key", "signature_scheme", "env"}``. Sign
   with the real key from now on, add the per-kernel environment, write ``started`` and
   serve. EOF instead of a line: the VM is being discarded, exit quietly.

Lean start: ipykernel 6 imports debugpy (~1 s under emulation) even when no client ever
debugs; unless ``--debugger`` is given it is hidden, and the kernel reports no debugger.

Guest side only: stdlib and the guest's ipykernel, nothing from the host package.
"""

from __future__ import annotations

import json
import os
import sys

CLAIM_FD, STATUS_FD = 3, 4  # protocol.LAUNCHER_CLAIM_FD / LAUNCHER_STATUS_FD


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
    _status("prepared")

    claim = _read_claim()
    if claim is None:
        os._exit(0)
    session = app.session
    if claim.get("signature_scheme"):
        session.signature_scheme = str(claim["signature_scheme"])
    session.key = str(claim.get("key", "")).encode()
    os.environ.update({str(k): str(v) for k, v in (claim.get("env") or {}).items()})
    _status("started")
    os.close(STATUS_FD)
    app.start()


if __name__ == "__main__":
    main(sys.argv[1:])
