"""The host's end of the virtio-serial multiplexer (wire format: ``guest/mux.py``).

QEMU connects its ``virtserialport`` chardev to a unix socket we listen on (one per VM, in
its runtime folder). ``HostMux.open_stream(port)`` then gives the same thing a vsock
connect gave: an asyncio (reader, writer) pair for a byte stream to guest ``port``. Each
stream is a local socketpair whose far end this module pumps to and from the port, so the
relay and the agent client use ordinary asyncio streams.

The guest writes every byte that comes in, and this end charges it for what its frames
cost, not only for their bytes:

* frames are parsed out of large reads, a fixed amount of work each; the loop yields every
  ``YIELD_EVERY`` frames, so a flood of tiny frames never stalls the other kernels of the
  process for long;
* a frame over ``MAX_PAYLOAD``, an empty DATA, or a kind the guest never sends is a
  protocol error: the VM's port is closed (every stream of the VM ends);
* per stream, DATA is charged against the window we gave and written to the local socket
  once per read; one give-back task per stream returns credit (one CREDIT for what the
  local reader took), so a frame costs no task and no reply of its own; a stream that
  sends past its credit is closed;
* what we queue towards the guest is capped (``MAX_TO_GUEST``): a guest that stops reading
  its port has it closed rather than making us buffer for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from pathlib import Path

from ..guest import mux as M

READ_BYTES = 256 << 10  # read from the port at a time
YIELD_EVERY = 1024  # frames handled between two yields to the loop
MAX_TO_GUEST = 4 << 20  # bytes queued towards the guest before its port is closed
_FROM_GUEST = frozenset({M.OPENED, M.DATA, M.CREDIT, M.CLOSE})


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
        self.unwritten: list[bytes] = []  # data of this read, written at its end
        self.writer: asyncio.StreamWriter | None = None  # our end of the local socketpair
        self.to_guest: asyncio.Task | None = None
        self.give_back: asyncio.Task | None = None
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

    async def _read_loop(self) -> None:
        assert self._reader is not None
        buf = bytearray(self._pending)
        self._pending = b""
        try:
            while True:
                data = await self._reader.read(READ_BYTES)
                if not data:
                    return
                buf += data
                at = await self._frames(buf)
                del buf[:at]
        except (OSError, M.MuxError, MuxClosed):
            pass
        finally:
            self._fail()

    async def _frames(self, buf: bytearray) -> int:
        """Handle every whole frame in ``buf``; returns how many bytes they took."""
        at, count, size = 0, 0, M.HEADER.size
        touched: set[_HostStream] = set()
        while len(buf) - at >= size:
            kind, sid, length = M.HEADER.unpack_from(buf, at)
            if length > M.MAX_PAYLOAD or kind not in _FROM_GUEST:
                raise M.MuxError(f"a frame of kind {kind} and {length} bytes from the guest")
            if kind == M.DATA and not length:
                raise M.MuxError("an empty DATA frame from the guest")
            if len(buf) - at - size < length:
                break
            payload = bytes(buf[at + size : at + size + length])
            at += size + length
            if (stream := self._dispatch(kind, sid, payload)) is not None:
                touched.add(stream)
            count += 1
            if count % YIELD_EVERY == 0:
                self._flush(touched)
                await asyncio.sleep(0)
        self._flush(touched)
        return at

    def _dispatch(self, kind: int, sid: int, payload: bytes) -> _HostStream | None:
        """One frame; returns the stream that got data to write."""
        stream = self._streams.get(sid)
        if stream is None:
            return None  # a stream we closed, or one the guest made up
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
                return None
            stream.unwritten.append(payload)
            return stream
        elif kind == M.CREDIT and len(payload) == 4:
            stream.credit = min(M.WINDOW, stream.credit + struct.unpack(">I", payload)[0])
            stream.credit_event.set()
        return None

    def _flush(self, touched: set[_HostStream]) -> None:
        """Write what each stream got in this read, and have its credit given back."""
        for stream in touched:
            if stream.closed or stream.writer is None or not stream.unwritten:
                continue
            stream.writer.write(b"".join(stream.unwritten))
            stream.unwritten.clear()
            if stream.give_back is None:
                stream.give_back = asyncio.ensure_future(self._give_back(stream))
        touched.clear()

    async def _give_back(self, stream: _HostStream) -> None:
        """Credit the guest for what our local reader has taken (the writer's buffer is
        under its limit again), in one CREDIT however many frames brought it."""
        assert stream.writer is not None
        try:
            with contextlib.suppress(OSError, ConnectionError, MuxClosed):
                while stream.received and not stream.closed:
                    # (the writer's limit is 0: this returns once all of it is in the socket,
                    # and every byte received was written: ``_flush`` runs before any yield)
                    await stream.writer.drain()
                    n, stream.received = stream.received, 0
                    self._send(M.frame(M.CREDIT, stream.sid, struct.pack(">I", n)))
        finally:
            stream.give_back = None

    def _send(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise MuxClosed("the VM's port is closed")
        if self._writer.transport.get_write_buffer_size() + len(data) > MAX_TO_GUEST:
            self._fail()  # the guest does not read its port
            raise MuxClosed("the VM stopped reading its port")
        self._writer.write(data)

    def _fail(self) -> None:
        """The port is done (the guest broke the protocol, stopped reading, or the VM
        stopped): every stream ends, nothing more is read or written."""
        self.closed.set()
        for stream in list(self._streams.values()):
            self._drop(stream)
        if self._writer is not None:
            self._writer.close()

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
        stream.writer.transport.set_write_buffer_limits(high=0)  # credit what the socket took
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
        stream.to_guest = asyncio.ensure_future(self._to_guest(stream, far_reader))
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
        for task in (stream.to_guest, stream.give_back):
            if task is not None and task is not current:
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
