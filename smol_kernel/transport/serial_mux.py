"""The host's end of the virtio-serial multiplexer (wire format: ``guest/mux.py``).

QEMU connects its ``virtserialport`` chardev to a unix socket we listen on (one per VM, in
its runtime folder). ``HostMux.open_stream(port)`` then gives the same thing a vsock
connect gave: an asyncio (reader, writer) pair for a byte stream to guest ``port``. Each
stream is a local socketpair whose far end this module pumps to and from the port, so the
relay and the agent client use ordinary asyncio streams.

The guest writes every byte that comes in: frame sizes are capped, a stream that sends past
the credit we gave it is closed, and what we hold per stream is bounded by the window (we
return credit only as the local reader takes the data).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from pathlib import Path

from ..guest import mux as M


class MuxClosed(ConnectionError):
    """The port's connection is gone (the VM stopped)."""


class _HostStream:
    def __init__(self, sid: int, port: int) -> None:
        self.sid, self.port = sid, port
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.credit = M.WINDOW  # bytes we may send to the guest
        self.credit_event = asyncio.Event()
        self.credit_event.set()
        self.received = 0  # bytes from the guest not yet given back as credit
        self.writer: asyncio.StreamWriter | None = None  # our end of the local socketpair
        self.tasks: list[asyncio.Task] = []
        self.closed = False


class HostMux:
    """One VM's port: listen on ``path``, accept QEMU, reset the guest's side, then open
    streams on request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.base_events.Server | None = None
        self._conn: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._streams: dict[int, _HostStream] = {}
        self._next = 1
        self._pending = b""  # read past the RESET_OK answer, not parsed yet
        self._task: asyncio.Task | None = None
        self.closed = asyncio.Event()

    async def listen(self) -> None:
        """Listen before QEMU starts (its chardev connects to us)."""
        loop = asyncio.get_running_loop()
        self._conn = loop.create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self._conn is not None and not self._conn.done():
                self._conn.set_result((reader, writer))
            else:
                writer.close()  # one QEMU, one connection

        self._server = await asyncio.start_unix_server(accepted, str(self.path),
                                                       limit=M.MAX_PAYLOAD * 4)  # fmt: skip
        os.chmod(self.path, 0o600)

    async def start(self, timeout: float) -> None:
        """Wait for QEMU's connection, reset the guest's end and wait for its answer (the
        guest has opened the port: the agent is up). TimeoutError, MuxClosed."""
        assert self._conn is not None
        self._reader, self._writer = await asyncio.wait_for(self._conn, timeout)
        if self._server is not None:
            self._server.close()
        nonce = os.urandom(M.NONCE_BYTES)
        self._writer.write(M.frame(M.RESET, 0, nonce))
        await self._writer.drain()
        await asyncio.wait_for(self._skip_to(M.reset_ok(nonce)), timeout)
        self._task = asyncio.ensure_future(self._read_loop())

    async def _skip_to(self, marker: bytes) -> None:
        """Drop what precedes ``marker``: frames a saved VM had queued for its old host."""
        assert self._reader is not None
        seen = b""
        while True:
            chunk = await self._reader.read(65536)
            if not chunk:
                raise MuxClosed("the VM closed its port before answering")
            seen = (seen + chunk)[-(len(marker) + 65536) :]
            at = seen.find(marker)
            if at >= 0:
                self._pending = seen[at + len(marker) :]
                return

    async def _exactly(self, n: int) -> bytes:
        assert self._reader is not None
        if self._pending:
            take, self._pending = self._pending[:n], self._pending[n:]
            if len(take) == n:
                return take
            return take + await self._reader.readexactly(n - len(take))
        return await self._reader.readexactly(n)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                head = await self._exactly(M.HEADER.size)
                kind, sid, length = M.HEADER.unpack(head)
                if length > M.MAX_PAYLOAD:
                    raise M.MuxError(f"a frame of {length} bytes from the guest")
                payload = await self._exactly(length) if length else b""
                self._dispatch(kind, sid, payload)
        except (asyncio.IncompleteReadError, OSError, M.MuxError, struct.error):
            pass
        finally:
            self.closed.set()
            for stream in list(self._streams.values()):
                self._drop(stream)

    def _dispatch(self, kind: int, sid: int, payload: bytes) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return  # a stream we closed, or one the guest made up
        if kind == M.OPENED and not stream.opened.done():
            stream.opened.set_result(True)
        elif kind == M.CLOSE:
            if not stream.opened.done():
                stream.opened.set_result(False)
            self._drop(stream)
        elif kind == M.DATA and stream.writer is not None:
            stream.received += len(payload)
            if stream.received > M.WINDOW:  # past the credit we gave: a broken guest
                self._close(stream)
                return
            stream.writer.write(payload)
            stream.tasks.append(asyncio.ensure_future(self._give_back(stream, len(payload))))
        elif kind == M.CREDIT and len(payload) == 4:
            stream.credit += struct.unpack(">I", payload)[0]
            stream.credit_event.set()

    async def _give_back(self, stream: _HostStream, n: int) -> None:
        """Credit the guest once our local reader has taken the data."""
        assert stream.writer is not None
        with contextlib.suppress(OSError, ConnectionError):
            await stream.writer.drain()
            stream.received -= n
            self._send(M.frame(M.CREDIT, stream.sid, struct.pack(">I", n)))
        with contextlib.suppress(ValueError):
            stream.tasks.remove(asyncio.current_task())  # type: ignore[arg-type]

    def _send(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise MuxClosed("the VM's port is closed")
        self._writer.write(data)

    async def open_stream(
        self, port: int, timeout: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to guest ``port``; ConnectionRefusedError if the guest refuses."""
        if self.closed.is_set() or self._writer is None:
            raise ConnectionRefusedError("the VM's port is closed")
        sid = self._next
        self._next += 1
        stream = _HostStream(sid, port)
        # The local socket exists before OPEN goes out: the guest's first bytes may come
        # in the same read as its OPENED (a ZMQ server greets as soon as it accepts).
        ours, theirs = socket.socketpair()
        far_reader, stream.writer = await asyncio.open_connection(sock=theirs, limit=M.WINDOW)
        self._streams[sid] = stream
        try:
            self._send(M.frame(M.OPEN, sid, struct.pack(">I", port)))
            ok = await asyncio.wait_for(asyncio.shield(stream.opened), timeout)
            if not ok:
                raise ConnectionRefusedError(f"guest port {port}: refused")
            reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 20)
        except BaseException:
            ours.close()
            self._close(stream)
            raise
        stream.tasks.append(asyncio.ensure_future(self._to_guest(stream, far_reader)))
        return reader, writer

    async def _to_guest(self, stream: _HostStream, far_reader: asyncio.StreamReader) -> None:
        try:
            while True:
                while stream.credit <= 0:
                    stream.credit_event.clear()
                    await stream.credit_event.wait()
                    if stream.closed:
                        return
                data = await far_reader.read(min(stream.credit, M.MAX_DATA))
                if not data:
                    break
                stream.credit -= len(data)
                self._send(M.frame(M.DATA, stream.sid, data))
                assert self._writer is not None
                await self._writer.drain()
        except (OSError, ConnectionError):
            pass
        self._close(stream)

    def _close(self, stream: _HostStream) -> None:
        """We end a stream: tell the guest, drop our side."""
        if not stream.closed:
            with contextlib.suppress(MuxClosed, OSError):
                self._send(M.frame(M.CLOSE, stream.sid))
        self._drop(stream)

    def _drop(self, stream: _HostStream) -> None:
        stream.closed = True
        stream.credit_event.set()
        self._streams.pop(stream.sid, None)
        if not stream.opened.done():
            stream.opened.set_result(False)
        if stream.writer is not None:
            stream.writer.close()
        current = asyncio.current_task()
        for task in stream.tasks:
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._conn is not None and not self._conn.done():
            self._conn.cancel()
        for stream in list(self._streams.values()):
            self._drop(stream)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._writer is not None:
            self._writer.close()
        self.closed.set()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
