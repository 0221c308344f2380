"""The guest-to-client direction of a kernel's channels, message by message, failing closed.

``MessageGate`` holds what one kernel's connections share: its key (to sign what we write),
the output policy (None: ``trusted_outputs``), the iopub backlog -- bytes written towards
iopub clients that their sockets have not taken yet -- and the count of what the guest sent
that the host could not parse. ``pump_messages`` reads ZMTP from the guest (``zmtp.py``) and
writes only what it parsed and wrote again:

* the greeting passes byte by byte once checked; the READY is parsed and written anew with
  the socket type the channel must have; later commands are dropped but PING/PONG, written
  anew;
* every message is read whole (``MAX_MESSAGE_BYTES`` at most; over it, the rest is skipped)
  and parsed strictly (``strict_message.parse``); one that does not parse is dropped and
  counted (``MessageGate.rejected``, one log line per kernel, a Prometheus counter). The
  output policy rewrites what it filters; the message goes out signed with the kernel's key
  over the frames serialized here;
* a message whose frames are not all buffered once ``READ_BYTES`` are is a large one: a
  pump holds the kernel's one large-message slot while it reads and writes it, so a kernel
  costs the host at most one ``MAX_MESSAGE_BYTES`` message at a time (plus ``READ_BYTES``
  per connection);
* towards iopub, when the kernel's backlog is over ``iopub_backlog`` bytes, an output
  message is dropped instead of queued (a small busy/idle status still goes: clients wait
  for it); once the backlog is under half the cap again, the client gets one stream line
  saying how much was dropped and why, in the cell that lost it.

A guest that breaks the framing loses that connection (ZmtpError).

Every message is written to the client in one piece, so a connection can move to another
guest between any two (a rewind, ``client_pump.py``): a pump can start on a stream whose
handshake the client already had (the new guest's greeting and READY are skipped), and
reports the parent of each shell message (``on_parent``: which request was answered).
``pump_frames`` does the same for the heartbeat, whose frames are not Jupyter messages: it
writes them framed anew, ``MAX_HEARTBEAT_BYTES`` a message at most. The gate keeps the
kernel's last ``execution_state`` from iopub status messages.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import metrics
from . import zmtp
from .output_policy import FILTERED_TYPES, OutputPolicy
from .strict_message import GuestMessage, Rejected, dumps, parse, sign

log = logging.getLogger("smol_kernel.relay")

MAX_MESSAGE_BYTES = 64 << 20  # a message a client may get from a kernel, at most
MAX_FRAMES = 4096  # frames of one message (buffers included)
MAX_HEARTBEAT_BYTES = 64 << 10  # a heartbeat echo, at most (a client pings a few bytes)
SMALL_STATUS_BYTES = 64 << 10  # a status message this small passes even over the backlog
READ_BYTES = 256 << 10  # read from the guest at a time; messages this small are taken whole
WRITE_BYTES = 256 << 10  # a large message is written to its client this much at a time
DEFAULT_IOPUB_BACKLOG = 256 << 20
RELAY_SESSION = "smol-kernel-relay"  # the session of messages the relay writes itself
# The socket type a guest's end of each channel must say it is in its READY.
SOCKET_TYPES = {
    "iopub": frozenset({b"PUB", b"XPUB"}),
    "shell": frozenset({b"ROUTER"}),
    "control": frozenset({b"ROUTER"}),
    "stdin": frozenset({b"ROUTER"}),
    "hb": frozenset({b"REP", b"ROUTER"}),
}


@dataclass
class MessageGate:
    """What the guest-to-client pumps of one kernel share."""

    key: bytes
    signature_scheme: str = "hmac-sha256"
    policy: OutputPolicy | None = None
    iopub_backlog: int = DEFAULT_IOPUB_BACKLOG
    _iopub_writers: set[asyncio.StreamWriter] = field(default_factory=set)
    dropped_messages: int = 0  # over the backlog, since the kernel started (tests, logs)
    peak_backlog: int = 0
    execution_state: str | None = None  # from the last iopub status message (guest-written)
    rejected: int = 0  # messages and commands the host could not parse, dropped
    large: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))

    def reject(self, channel: str, reason: str) -> None:
        """Count what the guest sent that was dropped unparsed; the first is logged."""
        self.rejected += 1
        metrics.guest_message_rejected(channel)
        if self.rejected == 1:
            log.warning("dropped a message from the kernel's VM that the host could not parse "
                        "(%s: %s); later ones are only counted", channel, reason[:200])  # fmt: skip

    def backlog(self) -> int:
        total = 0
        for w in list(self._iopub_writers):
            transport = w.transport
            if transport is not None and not transport.is_closing():
                total += transport.get_write_buffer_size()
        self.peak_backlog = max(self.peak_backlog, total)
        return total

    def room_for(self, size: int) -> bool:
        """May ``size`` more bytes be queued towards iopub clients? Always when nothing is
        queued (one message may be larger than the cap)."""
        backlog = self.backlog()
        return backlog == 0 or backlog + size <= self.iopub_backlog

    def sign(self, parts: list[bytes]) -> bytes:
        return sign(self.key, self.signature_scheme, parts)


@dataclass
class Progress:
    """Whether a pump has written part of a large message to its client (and not the
    rest: the connection cannot move then), and whether the guest's handshake has come
    (its READY: it has read the client's)."""

    partial: bool = False
    greeted: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Dropped:
    """Output one client missed since it was last told."""

    messages: int = 0
    nbytes: int = 0
    parent: bytes = b"{}"
    notice: asyncio.Task | None = None

    def count(self, gate: MessageGate, nbytes: int, parent: dict | None) -> None:
        """One more dropped message; its parent header says which cell lost output."""
        gate.dropped_messages += 1
        self.messages += 1
        self.nbytes += nbytes
        if self.messages == 1:
            log.warning("a client fell %d MiB behind the kernel's output: dropping output "
                        "(iopub_backlog_mib)", gate.iopub_backlog >> 20)  # fmt: skip
        if parent:
            self.parent = dumps(parent)


class FrameInput:
    """The guest's bytes, buffered here so that whole small messages are parsed without an
    await per frame (``whole_message``); large ones are read frame by frame (the async
    methods). ``buf[pos:]`` is what has not been consumed yet."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()
        self.pos = 0
        # whole_message's progress through a message not all here yet: (pos it started
        # at, offset from there of the next frame, the frames before it), so a message
        # arriving a read at a time is scanned once, not once per read.
        self._scan: tuple[int, int, list[bytes]] | None = None

    @property
    def pending(self) -> int:
        return len(self.buf) - self.pos

    def _consume(self, n: int) -> bytes:
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return data

    async def fill(self) -> None:
        data = await self.reader.read(READ_BYTES)
        if not data:
            raise asyncio.IncompleteReadError(bytes(self.buf[self.pos :]), None)
        if self.pos:
            # (pos only grows between compactions: a scan from another pos is stale)
            ok = self._scan is not None and self._scan[0] == self.pos
            self._scan = (0, *self._scan[1:]) if ok else None  # type: ignore[misc]
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def peek_header(self) -> zmtp.FrameHeader | None:
        return zmtp.parse_header(self.buf, self.pos)

    async def header(self) -> zmtp.FrameHeader:
        while (header := self.peek_header()) is None:
            await self.fill()
        self.pos += len(header.raw)
        return header

    async def exactly(self, size: int) -> bytes | bytearray:
        if size > self.pending + READ_BYTES:  # large: into one buffer as it comes, no join
            out = bytearray(size)
            view = memoryview(out)
            got = self.pending
            view[:got] = self.buf[self.pos :]
            self.pos = len(self.buf)
            while got < size:
                data = await self.reader.read(min(size - got, READ_BYTES))
                if not data:
                    raise asyncio.IncompleteReadError(bytes(out[:got]), size)
                view[got : got + len(data)] = data
                got += len(data)
            return out
        while self.pending < size:
            await self.fill()
        return self._consume(size)

    async def skip(self, size: int) -> None:
        """Consume ``size`` bytes without keeping them, a read at a time."""
        while size > 0:
            if not self.pending:
                await self.fill()
            size -= len(self._consume(min(size, self.pending)))

    def whole_message(self) -> list[bytes] | None:
        """The next message's frames if all of it is buffered, else None (also for a
        command, or more than MAX_FRAMES frames: the slow path decides)."""
        buf, end = self.buf, len(self.buf)
        scan, self._scan = self._scan, None
        if scan is not None and scan[0] == self.pos:  # (else the slow path took it)
            at, parts = self.pos + scan[1], scan[2]
        else:
            at, parts = self.pos, []
        while True:
            if end - at < 2:
                break
            flags = buf[at]
            if flags & ~(zmtp.MORE | zmtp.LONG):
                return None
            if flags & zmtp.LONG and end - at < 9:
                break
            if flags & zmtp.LONG:
                size, start = int.from_bytes(buf[at + 1 : at + 9], "big"), at + 9
            else:
                size, start = buf[at + 1], at + 2
            if len(parts) >= MAX_FRAMES:
                return None
            if start + size > end:
                break
            parts.append(bytes(buf[start : start + size]))
            at = start + size
            if not flags & zmtp.MORE:
                self.pos = at
                return parts
        self._scan = (self.pos, at - self.pos, parts)  # not all here yet: go on from here
        return None

    async def message(self, limit: int, max_frames: int = MAX_FRAMES) -> list[bytes] | None:
        """The next message (its first frame header not consumed yet), read frame by
        frame; None if it was over ``limit`` bytes or ``max_frames`` frames (the rest of
        it is skipped)."""
        parts: list[bytes] = []
        total = 0
        while True:
            header = await self.header()
            if header.command:
                raise zmtp.ZmtpError("a command inside a multipart message")
            total += header.size
            if total > limit or len(parts) >= max_frames:
                await self.skip(header.size)
                while header.more:
                    header = await self.header()
                    if header.command:
                        raise zmtp.ZmtpError("a command inside a multipart message")
                    await self.skip(header.size)
                return None
            parts.append(await self.exactly(header.size))
            if not header.more:
                return parts


async def _handshake(
    reader: asyncio.StreamReader, inp: FrameInput, writer: asyncio.StreamWriter,
    channel: str, skip: bool,
) -> None:  # fmt: skip
    """The guest's greeting (checked as it passes) and READY (parsed, written anew); with
    ``skip`` both are read and dropped (the client had them from the guest before)."""

    async def forward(data: bytes) -> None:
        if not skip:
            writer.write(data)
            await writer.drain()

    await zmtp.read_greeting(reader, forward)
    header = await inp.header()
    if not header.command or header.size > zmtp.MAX_COMMAND:
        raise zmtp.ZmtpError("no READY after the greeting")
    ready = zmtp.checked_ready(await inp.exactly(header.size), SOCKET_TYPES[channel])
    await forward(ready)


async def _command(
    inp: FrameInput, header: zmtp.FrameHeader, gate: MessageGate | None, channel: str
) -> bytes | None:  # fmt: skip
    """A command after the handshake (its header consumed): a heartbeat written anew, or
    None (dropped, counted)."""
    if header.size > zmtp.MAX_COMMAND:
        raise zmtp.ZmtpError(f"a ZMTP command over {zmtp.MAX_COMMAND >> 10} KiB")
    out = zmtp.checked_heartbeat(await inp.exactly(header.size))
    if out is None and gate is not None:
        gate.reject(channel, "a ZMTP command that is not PING or PONG")
    return out


async def pump_frames(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
    skip_handshake: bool = False, progress: Progress | None = None,
    gate: MessageGate | None = None,
) -> None:  # fmt: skip
    """Relay the heartbeat's echoes, each framed anew (see the module doc)."""
    progress = progress or Progress()
    inp = FrameInput(reader)
    await _handshake(reader, inp, writer, "hb", skip_handshake)
    progress.greeted.set()
    while True:
        while (header := inp.peek_header()) is None:
            await inp.fill()
        if header.command:
            inp.pos += len(header.raw)
            out = await _command(inp, header, gate, "hb")
        else:
            parts = await inp.message(MAX_HEARTBEAT_BYTES, max_frames=8)
            if parts is None:
                raise zmtp.ZmtpError("a heartbeat echo over 64 KiB")
            out = zmtp.frames(parts)
        if out is not None:
            writer.write(out)
            await writer.drain()


class _Pump:
    """One guest stream's messages to one client (``pump_messages``)."""

    def __init__(
        self, writer: asyncio.StreamWriter, channel: str, gate: MessageGate,
        on_parent: Callable[[str], None] | None,
    ) -> None:  # fmt: skip
        self.writer, self.channel, self.gate, self.on_parent = writer, channel, gate, on_parent
        self.iopub = channel == "iopub"
        self.dropped = _Dropped()

    def deliver(self, parts: list[bytes]) -> list[bytes] | None:
        """What to write to the client for one message from the guest (None: nothing)."""
        gate = self.gate
        try:
            msg = parse(parts, self.channel)
        except Rejected as e:
            gate.reject(self.channel, e.reason)
            return None
        msg_type = msg.msg_type
        if self.on_parent is not None and isinstance(msg.parent.get("msg_id"), str):
            self.on_parent(msg.parent["msg_id"])
        if self.iopub and msg_type == "status":
            gate.execution_state = msg.content["execution_state"]
        if gate.policy is not None and msg_type in FILTERED_TYPES:
            content = gate.policy.filter(msg_type, msg.content)
            if content is None:
                return None
            msg.content = content
        data = self._serialize(msg)
        if data is None:
            return None
        size = sum(map(len, data))
        small_status = msg_type == "status" and size <= SMALL_STATUS_BYTES
        if self.iopub and not small_status and not gate.room_for(size):
            self.dropped.count(gate, size, msg.parent)
            return None
        return data

    def _serialize(self, msg: GuestMessage) -> list[bytes] | None:
        try:
            return zmtp.frame_chunks(msg.frames(self.gate.key, self.gate.signature_scheme))
        except (ValueError, TypeError, RecursionError) as e:
            self.gate.reject(self.channel, f"{msg.msg_type}: cannot be written as JSON ({e})")
            return None

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        if self.dropped.messages and self.dropped.notice is None:
            self.dropped.notice = asyncio.ensure_future(self._notify())

    async def write_large(self, chunks: list[bytes], progress: Progress) -> None:
        """A large message a piece at a time, as the client takes it (one write of it all
        would copy what the socket does not take at once into the transport's buffer)."""
        progress.partial = True
        for chunk in chunks:
            view = memoryview(chunk)
            for at in range(0, len(view), WRITE_BYTES):
                self.writer.write(view[at : at + WRITE_BYTES])
                await self.writer.drain()
        progress.partial = False
        self.write(b"")

    async def _notify(self) -> None:
        """Once the client has caught up (backlog under half the cap), tell it what it
        missed (a whole message: writes never interleave)."""
        gate, dropped = self.gate, self.dropped
        while gate.backlog() >= gate.iopub_backlog // 2:
            await asyncio.sleep(0.2)
        self.writer.write(_drop_notice(gate, dropped))
        dropped.messages = dropped.nbytes = 0
        dropped.notice = None


async def pump_messages(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: str,
    gate: MessageGate, *, skip_handshake: bool = False, progress: Progress | None = None,
    on_parent: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """Relay what the guest sends on ``channel`` to one client (see the module doc). Returns
    when either side closes; raises ZmtpError if the guest breaks the framing."""
    progress = progress or Progress()
    pump = _Pump(writer, channel, gate, on_parent)
    if pump.iopub:
        gate._iopub_writers.add(writer)
        # Room decides what is dropped (room_for); this only stops a guest that sends
        # nothing but small status messages to a client that reads nothing.
        high = max(gate.iopub_backlog, MAX_MESSAGE_BYTES) + (1 << 20)
        writer.transport.set_write_buffer_limits(high=high, low=gate.iopub_backlog // 2)
    inp = FrameInput(reader)
    try:
        await _handshake(reader, inp, writer, channel, skip_handshake)
        progress.greeted.set()
        while True:
            ready: list[bytes] = []  # every whole message buffered, written at once
            while (parts := inp.whole_message()) is not None:
                if (out := pump.deliver(parts)) is not None:
                    ready += out
            if ready:
                pump.write(b"".join(ready))
            header = inp.peek_header()
            if header is None or (not header.command and inp.pending < READ_BYTES):
                await inp.fill()  # a message not all here yet, but small: wait for the rest
                continue
            if header.command:
                inp.pos += len(header.raw)
                if (command := await _command(inp, header, gate, channel)) is not None:
                    pump.write(command)
            else:
                async with gate.large:  # one large message of this kernel at a time
                    parts = await inp.message(MAX_MESSAGE_BYTES)
                    if parts is None:
                        gate.reject(channel, f"a message over {MAX_MESSAGE_BYTES >> 20} MiB")
                    out = None if parts is None else pump.deliver(parts)
                    del parts  # (the frames written are ``out``)
                    if out is not None:
                        await pump.write_large(out, progress)
            await writer.drain()
    finally:
        gate._iopub_writers.discard(writer)
        if pump.dropped.notice is not None:
            pump.dropped.notice.cancel()


def _drop_notice(gate: MessageGate, dropped: _Dropped) -> bytes:
    mib = dropped.nbytes / (1 << 20)
    text = (f"\n[smol-kernel: {dropped.messages} output message(s), {mib:.0f} MiB, were "
            f"dropped: a client fell more than {gate.iopub_backlog >> 20} MiB behind this "
            "kernel's output (SmolVMProvisioner.iopub_backlog_mib)]\n")  # fmt: skip
    header = dumps({
        "msg_id": uuid.uuid4().hex, "msg_type": "stream", "username": "smol-kernel",
        "session": RELAY_SESSION, "version": "5.3",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    })  # fmt: skip
    signed = [header, dropped.parent, b"{}", dumps({"name": "stderr", "text": text})]
    return zmtp.frames([b"stream.stderr", zmtp.DELIMITER, gate.sign(signed), *signed])
