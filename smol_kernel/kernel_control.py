"""A kernel's control socket: how ``smol-kernel checkpoint|rewind|checkpoints`` reach the
process that runs the kernel (a Jupyter server, a sandbox, ``smol-kernel run``).

The socket is ``kernel.sock`` in the runtime folder of the kernel's VM (0700, ours: see
``paths.runtime_dir``), served by the provisioner's process on the io loop; after a rewind
it moves with the VM. One JSON line in, one JSON line out, per connection:
``{"op": "checkpoint", "name": NAME|null, "keep": bool}``, ``{"op": "rewind", "name":
NAME}``, ``{"op": "list"}`` -> ``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT}``.
Nothing in the guest can reach it (the guest has no host sockets at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import CheckpointError
from .vm.base import VmError

if TYPE_CHECKING:
    from .timeline import Timeline

SOCKET_NAME = "kernel.sock"
MAX_REQUEST = 64 << 10


class KernelControl:
    def __init__(self, timeline: Timeline, folder: Path) -> None:
        self.timeline = timeline
        self.path = folder / SOCKET_NAME
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            reply = await self._handle(line[:MAX_REQUEST])
        except (TimeoutError, asyncio.TimeoutError, ValueError, OSError):
            reply = {"ok": False, "error": "bad request"}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()

    async def _handle(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            return {"ok": False, "error": "not a JSON object"}
        timeline = self.timeline
        try:
            if req.get("op") == "checkpoint":
                cp = await timeline.checkpoint(req.get("name"), bool(req.get("keep")))
                return {"ok": True, "checkpoint": cp.as_dict()}
            if req.get("op") == "rewind":
                cp = await timeline.rewind(str(req.get("name") or ""))
                return {"ok": True, "checkpoint": cp.as_dict()}
            if req.get("op") == "list":
                return {"ok": True, "checkpoints": [c.as_dict() for c in timeline.list()]}
        except (CheckpointError, VmError) as e:
            return {"ok": False, "error": str(e)}
        return {"ok": False, "error": f"unknown op {str(req.get('op'))[:40]!r}"}


def ask(folder: Path, request: dict, timeout: float = 600.0) -> dict:
    """Send one request to the kernel whose VM runs in ``folder`` (the CLI's side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(folder / SOCKET_NAME))
        except OSError as e:
            raise OSError(
                f"cannot reach the process running this kernel ({e}); only kernels started "
                "by this version of smol-kernel can be checkpointed from the command line"
            ) from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data or b"{}")
    return reply if isinstance(reply, dict) else {"ok": False, "error": "bad reply"}
