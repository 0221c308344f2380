"""ZMTP 3 framing, read from one direction of a relayed ZeroMQ connection.

The relay parses what the *guest* sends on the kernel's iopub, shell and control channels
so the host can apply its output policy and bound what it queues. Only what that needs:

* the 64-byte greeting, forwarded as it arrives (libzmq sends it in stages and waits for
  the peer's, so holding it back would deadlock), then checked: ZMTP 3.x with the NULL
  mechanism. CurveZMQ is encrypted end to end and cannot be filtered.
* frames: a flags byte (MORE, LONG, COMMAND), a 1- or 8-byte size, the body. Commands
  (READY, PING, ...) pass as they are; message frames are grouped into multipart messages.

Every size is the guest's claim: callers bound what they hold in memory.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

GREETING_SIZE = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
DELIMITER = b"<IDS|MSG>"


class ZmtpError(Exception):
    """The peer does not speak ZMTP 3 with the NULL mechanism, or broke its framing."""


@dataclass(frozen=True)
class FrameHeader:
    flags: int
    size: int
    raw: bytes

    @property
    def more(self) -> bool:
        return bool(self.flags & MORE)

    @property
    def command(self) -> bool:
        return bool(self.flags & COMMAND)


def check_greeting(greeting: bytes) -> None:
    """Raise ZmtpError unless ``greeting`` is a ZMTP 3.x greeting with the NULL mechanism."""
    if len(greeting) != GREETING_SIZE or greeting[0] != 0xFF or greeting[9] != 0x7F:
        raise ZmtpError("not a ZMTP greeting")
    if greeting[10] < 3:
        raise ZmtpError(f"ZMTP {greeting[10]}.x is not supported (3.x is)")
    mechanism = greeting[12:32].rstrip(b"\0")
    if mechanism != b"NULL":
        raise ZmtpError(
            f"the {mechanism.decode('ascii', 'replace')} mechanism is encrypted end to end"
        )


def frame(body: bytes, more: bool) -> bytes:
    """One message frame, header and body."""
    flags = MORE if more else 0
    if len(body) < 256:
        return bytes((flags, len(body))) + body
    return bytes((flags | LONG,)) + struct.pack(">Q", len(body)) + body


def frames(parts: list[bytes]) -> bytes:
    """A whole multipart message."""
    last = len(parts) - 1
    return b"".join(frame(p, i < last) for i, p in enumerate(parts))


async def read_greeting(reader: asyncio.StreamReader, forward) -> None:
    """Read the peer's greeting, calling ``forward(bytes)`` with each piece as it arrives,
    then check it (ZmtpError)."""
    got = b""
    while len(got) < GREETING_SIZE:
        chunk = await reader.read(GREETING_SIZE - len(got))
        if not chunk:
            raise asyncio.IncompleteReadError(got, GREETING_SIZE)
        got += chunk
        if got[:1] != b"\xff":
            raise ZmtpError("not a ZMTP greeting")
        await forward(chunk)
    check_greeting(got)


def parse_header(buf: bytes | bytearray, at: int = 0) -> FrameHeader | None:
    """The frame header at ``buf[at:]``, or None if not all of it is there yet."""
    if len(buf) - at < 2:
        return None
    flags = buf[at]
    if flags & ~(MORE | LONG | COMMAND):
        raise ZmtpError(f"bad frame flags {flags:#x}")
    if not flags & LONG:
        return FrameHeader(flags, buf[at + 1], bytes(buf[at : at + 2]))
    if len(buf) - at < 9:
        return None
    raw = bytes(buf[at : at + 9])
    return FrameHeader(flags, struct.unpack(">Q", raw[1:])[0], raw)
