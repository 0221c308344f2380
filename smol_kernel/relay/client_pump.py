"""The client-to-guest direction of a relayed connection, and what moving it takes.

A rewind replaces a kernel's VM while its clients stay connected: each client connection
(a ``Link``) is moved to a new stream into the new VM. What the relay keeps per link for
that:

* the client's half of the ZMTP handshake (greeting and READY: a client sends them once),
  written into the new stream before anything else, and on iopub its subscriptions, written
  once the new guest has answered the handshake (its greeting and READY are skipped on the
  way back: ``pump_messages``);
* on shell, the requests the kernel has not answered yet, sent again to the new kernel,
  which never saw them (an answer's parent header, seen by the guest-to-client pump,
  clears its request).

Client bytes go on a whole message at a time, so a link can be *held* between two
messages (no new request reaches a kernel that is being saved) and moved. What a client
sends is the user's own, but what the relay keeps is capped: a message over
``MAX_KEPT_MESSAGE`` is relayed as it comes and not kept, and a link keeps at most
``MAX_KEPT_BYTES`` of unanswered requests; one that was not kept is lost if the kernel is
rewound before it answers (counted in ``Link.lost``, logged).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from . import zmtp
from .message_pump import FrameInput, Progress

MAX_KEPT_MESSAGE = 16 << 20  # a client message larger than this is streamed, not kept
MAX_KEPT_BYTES = 64 << 20  # unanswered requests kept per link


class Link:
    """One client connection and the guest stream it is relayed to (which can change)."""

    def __init__(
        self, channel: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.channel = channel
        self.c_reader, self.c_writer = reader, writer
        self.g_reader: asyncio.StreamReader | None = None
        self.g_writer: asyncio.StreamWriter | None = None
        self.handshake = bytearray()  # the client's greeting and READY
        self.ready_seen = False
        self.subscriptions: list[bytes] = []  # iopub: as the client sent them
        self.pending: dict[str, bytes] = {}  # shell: unanswered request id -> its bytes
        self.sent: set[str] = set()  # those of them written to a guest (not held here)
        self.kept = 0
        self.lost = 0  # requests relayed but not kept (too large), since the last move
        self.flowing = asyncio.Event()  # clear: hold the next message
        self.flowing.set()
        self.created = asyncio.get_running_loop().time()
        self.subscribed = asyncio.Event()  # iopub: a subscription went to a guest stream
        self.on_subscribed: Callable[[], None] | None = None  # told when it first does
        self.between = asyncio.Event()  # set: no message is half written to the guest
        self.between.set()
        self.down = Progress()  # the guest-to-client pump's
        self.down_task: asyncio.Future | None = None

    def note_subscribed(self) -> None:
        if not self.subscribed.is_set():
            self.subscribed.set()
            if self.on_subscribed is not None:
                self.on_subscribed()

    def answered(self, msg_id: str) -> None:
        """A shell message from the kernel answered the request ``msg_id``."""
        self.forget(msg_id)

    def forget(self, msg_id: str) -> None:
        self.sent.discard(msg_id)
        if (data := self.pending.pop(msg_id, None)) is not None:
            self.kept -= len(data)

    def unanswered(self) -> list[bytes]:
        """Requests written to the guest and not answered, in the order they came."""
        return [data for msg_id, data in self.pending.items() if msg_id in self.sent]

    def replay(self) -> bytes:
        """What a new guest stream must get first to stand for this client: its handshake.
        (Subscriptions go once the guest has answered it: libzmq drops a connection whose
        SUBSCRIBE arrives before its own READY went out.)"""
        return bytes(self.handshake)

    def _keep(self, parts: list[bytes], data: bytes) -> str | None:
        """Note a client message; returns a shell request's id once it is kept."""
        if self.channel == "iopub":  # a SUB sends nothing but (un)subscriptions
            self.subscriptions.append(data)
            return None
        if self.channel != "shell":
            return None
        try:
            envelope = parts.index(zmtp.DELIMITER) + 1
        except ValueError:
            return None
        header = parts[envelope + 1] if len(parts) > envelope + 1 else b""
        try:
            value = json.loads(header)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict) or not str(value.get("msg_type", "")).endswith("_request"):
            return None  # comm messages are not answered: nothing to wait for
        msg_id = value.get("msg_id")
        if not isinstance(msg_id, str):
            return None
        if self.kept + len(data) > MAX_KEPT_BYTES:
            self.lost += 1
            return None
        self.pending[msg_id] = data
        self.kept += len(data)
        return msg_id

    async def _write(self, data: bytes, msg_id: str | None = None) -> None:
        await self.flowing.wait()
        writer = self.g_writer
        if writer is None:
            raise ConnectionResetError("no guest stream")
        writer.write(data)
        if msg_id is not None:
            self.sent.add(msg_id)
        try:
            await writer.drain()
        except ConnectionError:
            if writer is self.g_writer:
                raise  # the stream broke; it was not moved away
            # (moved: the data went with the old stream; a shell request is sent again)


async def pump_client(link: Link) -> None:
    """Relay what the client sends to the link's current guest stream, a message at a
    time (see the module doc). Returns when the client closes; ZmtpError if it does not
    speak ZMTP 3."""

    async def forward(data: bytes) -> None:  # the greeting goes on as it comes (libzmq
        link.handshake += data  # sends it in parts and waits for the other side's)
        assert link.g_writer is not None
        link.g_writer.write(data)
        await link.g_writer.drain()

    await zmtp.read_greeting(link.c_reader, forward)
    inp = FrameInput(link.c_reader)
    while True:
        header = await inp.header()
        if header.command:
            if header.size > zmtp.MAX_COMMAND:
                raise zmtp.ZmtpError("a ZMTP command over 64 KiB from a client")
            data = header.raw + await inp.exactly(header.size)
            body = data[len(header.raw) :]
            name = body[1 : 1 + body[0]] if body else b""
            if not link.ready_seen:
                link.handshake += data
                link.ready_seen = name == b"READY"
            elif name in (b"SUBSCRIBE", b"CANCEL"):
                link.subscriptions.append(data)
            await link._write(data)
            if name == b"SUBSCRIBE":
                link.note_subscribed()
            continue
        raws, parts, size = [header.raw], [], header.size
        while size <= MAX_KEPT_MESSAGE:
            parts.append(await inp.exactly(header.size))
            if not header.more:
                break
            header = await inp.header()
            if header.command:
                raise zmtp.ZmtpError("a command inside a multipart message")
            raws.append(header.raw)
            size += header.size
        else:  # too large to keep: stream the rest as it comes
            await link.flowing.wait()
            link.between.clear()
            try:
                await _stream(link, inp, raws, parts, header)
            finally:
                link.between.set()
            if link.channel == "shell":
                link.lost += 1
            continue
        data = b"".join(r + p for r, p in zip(raws, parts, strict=True))
        await link._write(data, link._keep(parts, data))
        if link.channel == "iopub" and parts[0][:1] == b"\x01":  # ZMTP 3.0's subscribe
            link.note_subscribed()


async def _stream(
    link: Link, inp: FrameInput, raws: list[bytes], parts: list[bytes], header
) -> None:  # fmt: skip
    """Write the frames read so far and copy the rest of the message (``header``, the
    last of ``raws``, is the frame whose body is not read yet)."""
    writer = link.g_writer
    if writer is None:
        raise ConnectionResetError("no guest stream")
    for raw, part in zip(raws[:-1], parts, strict=True):
        writer.write(raw + part)
    writer.write(raws[-1])
    await inp.copy(writer, header.size)
    while header.more:
        header = await inp.header()
        if header.command:
            raise zmtp.ZmtpError("a command inside a multipart message")
        writer.write(header.raw)
        await inp.copy(writer, header.size)
