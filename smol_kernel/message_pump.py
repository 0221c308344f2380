"""The guest-to-client direction of the iopub, shell and control channels, message by message.

``MessageGate`` holds what one kernel's connections share: its key (to sign what the policy
rewrote), the output policy (None: ``trusted_outputs``), and the iopub backlog -- bytes
written towards iopub clients that their sockets have not taken yet. ``pump_messages`` reads
ZMTP frames from the guest (``zmtp.py``) and writes what clients may see:

* commands and messages the policy does not rewrite stream through as they came (only
  their first frames are held, 64 KiB at most, to read the message type);
* a message the policy rewrites is read whole (at most ``MAX_MESSAGE_BYTES``), rewritten,
  signed again and sent; one it drops is not sent;
* towards iopub, when the kernel's backlog is over ``iopub_backlog`` bytes, an output
  message is dropped instead of queued (a small busy/idle status still goes: clients wait
  for it); once the backlog is under half the cap again, the client gets one stream line
  saying how much was dropped and why, in the cell that lost it.

A message over ``MAX_MESSAGE_BYTES`` never reaches a client; a guest that breaks the
framing loses that connection (ZmtpError).

For moving a client's connection to another guest (a rewind, ``client_pump.py``): a pump
says in ``Progress`` whether a message went to the client in part (then the connection
cannot move), can start on a stream whose handshake the client already had (the new
guest's greeting and READY are skipped), and reports the parent of each shell message
(``on_parent``: which request was answered). ``pump_frames`` does the same for the
heartbeat, whose frames are not Jupyter messages. The gate keeps the kernel's last
``execution_state`` from iopub status messages.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import zmtp
from .output_policy import FILTERED_TYPES, OutputPolicy

log = logging.getLogger("smol_kernel.relay")

MAX_MESSAGE_BYTES = 64 << 20  # a message a client may get from a kernel, at most
MAX_ENVELOPE_BYTES = 64 << 10  # routing frames, delimiter, signature and header together
MAX_FRAMES = 4096  # frames of one message (buffers included)
SMALL_STATUS_BYTES = 64 << 10  # a status message this small passes even over the backlog
READ_BYTES = 256 << 10  # read from the guest at a time; messages this small are taken whole
DEFAULT_IOPUB_BACKLOG = 256 << 20
RELAY_SESSION = "smol-kernel-relay"  # the session of messages the relay writes itself


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8", "surrogateescape")


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

    def note_status(self, content: bytes) -> None:
        try:
            state = json.loads(content).get("execution_state")
        except (ValueError, RecursionError, AttributeError):
            return
        if state in ("busy", "idle", "starting"):
            self.execution_state = state

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
        if not self.key:
            return b""
        digest = self.signature_scheme.partition("-")[2] or "sha256"
        h = hmac.new(self.key, digestmod=digest)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()


@dataclass
class Progress:
    """Whether a pump has written part of a message to its client (and not the rest), and
    whether the guest's handshake has come (its READY: it has read the client's)."""

    partial: bool = False
    greeted: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Dropped:
    """Output one client missed since it was last told; the lock keeps a notice from being
    written into the middle of a message."""

    messages: int = 0
    nbytes: int = 0
    parent: bytes = b"{}"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    notice: asyncio.Task | None = None

    def count(self, gate: MessageGate, parts: list[bytes], envelope: int) -> None:
        """One more dropped message; its parent header says which cell lost output."""
        gate.dropped_messages += 1
        self.messages += 1
        self.nbytes += sum(len(p) for p in parts)
        if self.messages == 1:
            log.warning("a client fell %d MiB behind the kernel's output: dropping output "
                        "(iopub_backlog_mib)", gate.iopub_backlog >> 20)  # fmt: skip
        parent = parts[envelope + 2] if len(parts) > envelope + 2 else b""
        try:
            if isinstance(json.loads(parent), dict):
                self.parent = parent
        except (ValueError, RecursionError):
            pass


class FrameInput:
    """The guest's bytes, buffered here so that whole small messages are parsed without an
    await per frame (``whole_message``); large frames are streamed (the async methods).
    ``buf[pos:]`` is what has not been consumed yet."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()
        self.pos = 0

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

    async def exactly(self, size: int) -> bytes:
        while self.pending < size:
            await self.fill()
        return self._consume(size)

    async def copy(self, writer: asyncio.StreamWriter | None, size: int) -> None:
        """Pass ``size`` bytes on to ``writer`` (None: skip them), a read at a time."""
        while size > 0:
            if not self.pending:
                await self.fill()
            data = self._consume(min(size, self.pending))
            size -= len(data)
            if writer is not None:
                writer.write(data)
                await writer.drain()

    def whole_message(self) -> tuple[list[bytes], list[bytes]] | None:
        """The next message's (raw headers, bodies) if all of it is buffered, else None."""
        buf, end = self.buf, len(self.buf)
        raws: list[bytes] = []
        parts: list[bytes] = []
        at = self.pos
        while True:
            if end - at < 2:
                return None
            flags = buf[at]
            if flags & ~(zmtp.MORE | zmtp.LONG) or (flags & zmtp.LONG and end - at < 9):
                return None  # a command, bad flags, or not here yet: the slow path decides
            if flags & zmtp.LONG:
                size, start = int.from_bytes(buf[at + 1 : at + 9], "big"), at + 9
            else:
                size, start = buf[at + 1], at + 2
            if start + size > end or len(parts) >= MAX_FRAMES:
                return None
            raws.append(bytes(buf[at:start]))
            parts.append(bytes(buf[start : start + size]))
            at = start + size
            if not flags & zmtp.MORE:
                self.pos = at
                return raws, parts


async def _skip_handshake(reader: asyncio.StreamReader, inp: FrameInput) -> None:
    """A guest's greeting and READY, which the client already had from the guest before."""

    async def discard(_: bytes) -> None:
        pass

    await zmtp.read_greeting(reader, discard)
    header = await inp.header()
    if not header.command or header.size > MAX_ENVELOPE_BYTES:
        raise zmtp.ZmtpError("no READY after the greeting")
    await inp.copy(None, header.size)


async def pump_frames(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
    skip_handshake: bool = False, progress: Progress | None = None,
) -> None:  # fmt: skip
    """Relay frames as they come, knowing where each ends (the heartbeat)."""
    progress = progress or Progress()
    inp = FrameInput(reader)
    if skip_handshake:
        await _skip_handshake(reader, inp)
    else:
        await zmtp.read_greeting(reader, lambda data: _send(writer, data))
    progress.greeted.set()
    while True:
        header = await inp.header()
        progress.partial = True
        writer.write(header.raw)
        await inp.copy(writer, header.size)
        progress.partial = header.more
        await writer.drain()


async def pump_messages(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: str,
    gate: MessageGate, *, skip_handshake: bool = False, progress: Progress | None = None,
    on_parent: Callable[[bytes], None] | None = None,
) -> None:  # fmt: skip
    """Relay what the guest sends on ``channel`` to one client (see the module doc). Returns
    when either side closes; raises ZmtpError if the guest breaks the framing."""
    iopub = channel == "iopub"
    progress = progress or Progress()
    dropped = _Dropped()
    if iopub:
        gate._iopub_writers.add(writer)
        # Room decides what is dropped (room_for); this only stops a guest that sends
        # nothing but small status messages to a client that reads nothing.
        high = max(gate.iopub_backlog, MAX_MESSAGE_BYTES) + (1 << 20)
        writer.transport.set_write_buffer_limits(high=high, low=gate.iopub_backlog // 2)
    inp = FrameInput(reader)
    try:
        if skip_handshake:
            await _skip_handshake(reader, inp)
        else:
            await zmtp.read_greeting(reader, lambda data: _send(writer, data))
        progress.greeted.set()
        while True:
            ready = []  # every whole message buffered, written at once
            while (whole := inp.whole_message()) is not None:
                out = _whole(whole[0], whole[1], channel, gate, dropped, on_parent)
                if out is not None:
                    ready.append(out)
            if ready:
                writer.write(b"".join(ready))
            header = inp.peek_header()
            if header is None or (not header.command and inp.pending < READ_BYTES):
                await inp.fill()  # a message not all here yet, but small: wait for the rest
                continue
            inp.pos += len(header.raw)
            progress.partial = True
            if header.command:
                async with dropped.lock:
                    writer.write(header.raw)
                    await inp.copy(writer, header.size)
            else:
                await _message(inp, writer, header, channel, gate, dropped, on_parent)
            progress.partial = False
            if dropped.messages and dropped.notice is None:
                dropped.notice = asyncio.ensure_future(_notify(writer, gate, dropped))
            await writer.drain()
    finally:
        gate._iopub_writers.discard(writer)
        if dropped.notice is not None:
            dropped.notice.cancel()


def _whole(
    raws: list[bytes], parts: list[bytes], channel: str, gate: MessageGate, dropped: _Dropped,
    on_parent: Callable[[bytes], None] | None = None,
) -> bytes | None:  # fmt: skip
    """What to send of a message read whole (None: nothing), by the same rules as
    ``_message`` applies to one read frame by frame."""
    try:
        envelope = parts.index(zmtp.DELIMITER) + 1
    except ValueError:
        return None  # not a Jupyter message: clients would drop it too
    if len(parts) < envelope + 5 or sum(map(len, parts[: envelope + 2])) > MAX_ENVELOPE_BYTES:
        raise zmtp.ZmtpError("a Jupyter message without its frames, or oversized headers")
    size = sum(map(len, parts)) + sum(map(len, raws))
    if size > MAX_MESSAGE_BYTES:
        raise zmtp.ZmtpError(f"a message over {MAX_MESSAGE_BYTES >> 20} MiB")
    msg_type = _msg_type(parts[envelope + 1])
    iopub = channel == "iopub"
    if on_parent is not None:
        on_parent(parts[envelope + 2])
    if iopub and msg_type == "status":
        gate.note_status(parts[envelope + 4])
    out = b"".join(r + p for r, p in zip(raws, parts, strict=True))
    if gate.policy is not None and msg_type in FILTERED_TYPES:
        new = _apply_policy(gate, msg_type, parts, envelope)
        if new is None:
            return None
        if new is not parts:
            out = zmtp.frames(new)
    small_status = msg_type == "status" and size <= SMALL_STATUS_BYTES
    if iopub and not small_status and not gate.room_for(len(out)):
        dropped.count(gate, parts, envelope)
        return None
    return out


async def _notify(writer: asyncio.StreamWriter, gate: MessageGate, dropped: _Dropped) -> None:
    """Once the client has caught up (backlog under half the cap), tell it what it missed."""
    while gate.backlog() >= gate.iopub_backlog // 2:
        await asyncio.sleep(0.2)
    async with dropped.lock:
        writer.write(_drop_notice(gate, dropped))
        dropped.messages = dropped.nbytes = 0
        dropped.notice = None


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def _next_frame(inp: FrameInput, previous: zmtp.FrameHeader) -> zmtp.FrameHeader:
    if not previous.more:
        raise zmtp.ZmtpError("a Jupyter message ended early")
    header = await inp.header()
    if header.command:
        raise zmtp.ZmtpError("a command inside a multipart message")
    return header


async def _skip_rest(inp: FrameInput, header: zmtp.FrameHeader) -> None:
    """Skip the frames after ``header``'s body (already read)."""
    while header.more:
        header = await _next_frame(inp, header)
        await inp.copy(None, header.size)


async def _message(
    inp: FrameInput, writer: asyncio.StreamWriter, first: zmtp.FrameHeader,
    channel: str, gate: MessageGate, dropped: _Dropped,
    on_parent: Callable[[bytes], None] | None = None,
) -> None:  # fmt: skip
    """A message too large to wait for whole: its first frames are held, the rest
    streamed (or, for the policy, read up to MAX_MESSAGE_BYTES)."""
    # Routing frames up to the delimiter, then signature and header: small, held.
    raws: list[bytes] = []
    parts: list[bytes] = []
    header = first
    held = 0
    while True:
        held += header.size
        if held > MAX_ENVELOPE_BYTES or len(parts) > MAX_FRAMES:
            raise zmtp.ZmtpError("routing frames of a message too large")
        body = await inp.exactly(header.size)
        raws.append(header.raw)
        parts.append(body)
        if body == zmtp.DELIMITER:
            break
        if not header.more:
            return  # not a Jupyter message: clients would drop it too
        header = await _next_frame(inp, header)
    envelope = len(parts)
    # Signature, header, and for the reply tracking the parent header too.
    for _ in range(2 if on_parent is None else 3):
        header = await _next_frame(inp, header)
        held += header.size
        if held > MAX_ENVELOPE_BYTES:
            raise zmtp.ZmtpError("the header of a message is too large")
        raws.append(header.raw)
        parts.append(await inp.exactly(header.size))
    msg_type = _msg_type(parts[envelope + 1])
    iopub = channel == "iopub"
    if on_parent is not None:
        on_parent(parts[envelope + 2])

    if gate.policy is not None and msg_type in FILTERED_TYPES:
        if not await _read_rest(inp, header, parts, raws, MAX_MESSAGE_BYTES - held):
            log.warning("dropped a %s message of over %d MiB from the kernel", msg_type,
                        MAX_MESSAGE_BYTES >> 20)  # fmt: skip
            if iopub:
                dropped.count(gate, parts, envelope)
            return
        out = _apply_policy(gate, msg_type, parts, envelope)
        if out is None:
            return
        data = zmtp.frames(out)
        if iopub and not gate.room_for(len(data)):
            dropped.count(gate, parts, envelope)
            return
        async with dropped.lock:
            writer.write(data)
        return

    if iopub and msg_type == "status":  # always passes when small: clients wait for idle
        if await _read_rest(inp, header, parts, raws, SMALL_STATUS_BYTES - held):
            if len(parts) > envelope + 4:
                gate.note_status(parts[envelope + 4])
            async with dropped.lock:
                writer.write(b"".join(r + p for r, p in zip(raws, parts, strict=True)))
        else:
            dropped.count(gate, parts, envelope)
        return

    total = held
    async with dropped.lock:
        if iopub:  # parent and metadata (small), then the content's size decides
            for _ in range(2):
                header = await _next_frame(inp, header)
                total += header.size
                if total > MAX_ENVELOPE_BYTES:
                    raise zmtp.ZmtpError("the headers of a message are too large")
                raws.append(header.raw)
                parts.append(await inp.exactly(header.size))
            content = await _next_frame(inp, header)
            if not gate.room_for(total + content.size):
                await inp.copy(None, content.size)
                await _skip_rest(inp, content)
                dropped.count(gate, parts, envelope)
                return
            raws.append(content.raw)
            parts.append(b"")
            total += content.size
            writer.write(b"".join(r + p for r, p in zip(raws, parts, strict=True)))
            await inp.copy(writer, content.size)
            header = content
        else:
            writer.write(b"".join(r + p for r, p in zip(raws, parts, strict=True)))
        # The rest as it comes, bounded in total.
        frames = len(parts)
        while header.more:
            header = await _next_frame(inp, header)
            total += header.size
            frames += 1
            if total > MAX_MESSAGE_BYTES or frames > MAX_FRAMES:
                raise zmtp.ZmtpError(f"a {msg_type} message over {MAX_MESSAGE_BYTES >> 20} MiB")
            writer.write(header.raw)
            await inp.copy(writer, header.size)


async def _read_rest(
    inp: FrameInput, header: zmtp.FrameHeader, parts: list[bytes], raws: list[bytes], limit: int
) -> bool:
    """Read the remaining frames into ``parts``/``raws`` if they fit in ``limit`` bytes in
    all; else skip what is left of the message and return False (the parent header is
    still read into ``parts`` when it is small, to say which cell lost output)."""
    first = True
    while header.more:
        nxt = await _next_frame(inp, header)
        fits = nxt.size <= limit and len(parts) < MAX_FRAMES
        keep_parent = first and nxt.size <= MAX_ENVELOPE_BYTES
        first = False
        if not fits:
            if keep_parent:
                parts.append(await inp.exactly(nxt.size))
            else:
                await inp.copy(None, nxt.size)
            await _skip_rest(inp, nxt)
            return False
        limit -= nxt.size
        raws.append(nxt.raw)
        parts.append(await inp.exactly(nxt.size))
        header = nxt
    return True


def _msg_type(header: bytes) -> str | None:
    try:
        value = json.loads(header)
    except (ValueError, RecursionError):
        return None
    msg_type = value.get("msg_type") if isinstance(value, dict) else None
    return msg_type if isinstance(msg_type, str) else None


def _apply_policy(
    gate: MessageGate, msg_type: str, parts: list[bytes], envelope: int
) -> list[bytes] | None:
    """The message's frames after the policy (re-signed if rewritten), or None to drop."""
    signed = parts[envelope + 1 : envelope + 5]  # header, parent, metadata, content
    if len(signed) < 4:
        return None
    assert gate.policy is not None
    try:
        content = json.loads(signed[3])
    except (ValueError, RecursionError):
        return None
    new = gate.policy.filter(msg_type, content)
    if new is None:
        return None
    if new is content:
        return parts
    try:
        signed[3] = _json(new)
    except (TypeError, ValueError):
        return None
    return [*parts[:envelope], gate.sign(signed), *signed, *parts[envelope + 5 :]]


def _drop_notice(gate: MessageGate, dropped: _Dropped) -> bytes:
    mib = dropped.nbytes / (1 << 20)
    text = (f"\n[smol-kernel: {dropped.messages} output message(s), {mib:.0f} MiB, were "
            f"dropped: a client fell more than {gate.iopub_backlog >> 20} MiB behind this "
            "kernel's output (SmolVMProvisioner.iopub_backlog_mib)]\n")  # fmt: skip
    header = _json({
        "msg_id": uuid.uuid4().hex, "msg_type": "stream", "username": "smol-kernel",
        "session": RELAY_SESSION, "version": "5.3",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    })  # fmt: skip
    signed = [header, dropped.parent, b"{}", _json({"name": "stderr", "text": text})]
    return zmtp.frames([b"stream.stderr", zmtp.DELIMITER, gate.sign(signed), *signed])
