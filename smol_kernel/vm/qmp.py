"""A small QMP client: what saving and restoring a VM needs of QEMU's machine protocol.

One connection per VM, on a unix socket in its runtime folder (``-qmp unix:PATH,server=on,
wait=off``). ``execute`` sends a command and returns its ``return`` value, raising QmpError
with QEMU's own message; asynchronous events are kept in ``events``. ``send_fd`` passes a
descriptor with ``getfd`` (SCM_RIGHTS), which is how a migration stream reaches a QEMU that
may not open files itself (``-sandbox``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

from ..error_root import SmolKernelError


class QmpError(SmolKernelError):
    """QEMU refused a command or the connection broke; the message is QEMU's."""


class Qmp:
    def __init__(self, sock: socket.socket, reader, writer) -> None:
        self._sock, self._reader, self._writer = sock, reader, writer
        self.events: list[dict] = []

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> Qmp:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QEMU's QMP socket {path} did not open") from None
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        qmp = cls(sock, reader, writer)
        try:
            await asyncio.wait_for(qmp._read_message(), timeout)  # the greeting
            await qmp.execute("qmp_capabilities")
        except (TimeoutError, asyncio.TimeoutError, ValueError) as e:
            await qmp.close()
            raise QmpError(f"QEMU's QMP did not answer: {e or 'timed out'}") from None
        except BaseException:
            await qmp.close()
            raise
        return qmp

    async def _read_message(self) -> dict:
        line = await self._reader.readline()
        if not line:
            raise QmpError("QEMU closed its QMP connection")
        return json.loads(line)

    async def execute(self, command: str, timeout: float = 30.0, **arguments) -> object:
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self._writer.write(json.dumps(msg).encode() + b"\n")
        await self._writer.drain()
        return await asyncio.wait_for(self._reply(command), timeout)

    async def _reply(self, command: str) -> object:
        while True:
            msg = await self._read_message()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QmpError(f"{command}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    async def send_fd(self, name: str, fd: int) -> None:
        """``getfd``: QEMU keeps ``fd`` under ``name`` (for ``migrate uri=fd:NAME``)."""
        msg = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode() + b"\n"
        await self._writer.drain()  # nothing of ours is queued: the socket is free to use
        # The descriptor rides on the command's own bytes (SCM_RIGHTS), a short send.
        socket.send_fds(self._sock, [msg], [fd])
        await asyncio.wait_for(self._reply("getfd"), 10)

    async def wait_migration(self, timeout: float) -> dict:
        """Poll ``query-migrate`` until it completes; QmpError if it fails."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', info)}")
            if time.monotonic() > deadline:
                raise QmpError(f"migration not done within {timeout:.0f}s ({status})")
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
