"""ZMTP 3 framing, read from one direction of a relayed ZeroMQ connection.

The relay parses what the *guest* sends on the kernel's iopub, shell and control channels
so the host can apply its output policy and bound what it queues. Only what that needs:

* the 64-byte greeting, forwarded as it arrives (libzmq sends it in stages and waits for
  the peer's, so holding it back would deadlock), each byte checked before it goes on:
  ZMTP 3.x with the NULL mechanism and zero filler, so what passes is the one greeting
  such a peer can send (byte 8, the minor version and as-server aside). CurveZMQ is
  encrypted end to end and cannot be filtered.
* frames: a flags byte (MORE, LONG, COMMAND), a 1- or 8-byte size, the body. Commands are
  parsed (``parse_command``) and only a READY naming the socket type we expect, a PING or a
  PONG is written again (``ready``, ``command``); message frames are grouped into multipart
  messages.

Every size is the guest's claim: callers bound what they hold in memory.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

GREETING_SIZE = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
DELIMITER = b"<IDS|MSG>"
MAX_COMMAND = 64 << 10  # a ZMTP command, at most (READY with its properties, PING, ...)
MAX_PING_CONTEXT = 16  # ZMTP 3.1: a PING's context is at most 16 bytes


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
    return b"".join(frame_chunks(parts))


def frame_chunks(parts: list[bytes]) -> list[bytes]:
    """A whole multipart message as a list of frame headers and bodies (no copy)."""
    out = []
    last = len(parts) - 1
    for i, body in enumerate(parts):
        flags = MORE if i < last else 0
        if len(body) < 256:
            out.append(bytes((flags, len(body))) + body)
        else:
            out += (bytes((flags | LONG,)) + struct.pack(">Q", len(body)), body)
    return out


def _greeting_byte_ok(at: int, value: int) -> bool:
    """May byte ``at`` of a ZMTP 3 NULL greeting be ``value``? (Byte 8 is libzmq's
    routing-id length + 1 for ZMTP 1.0 peers; 11 the minor version; 32 as-server.)"""
    if at == 0:
        return value == 0xFF
    if at == 9:
        return value == 0x7F
    if at == 10:
        return value == 3
    if at == 11:
        return value in (0, 1)
    if 12 <= at < 16:
        return value == b"NULL"[at - 12]
    if at in (8, 32):
        return value <= 1 if at == 32 else True
    return value == 0


async def read_greeting(reader: asyncio.StreamReader, forward) -> None:
    """Read the peer's greeting, calling ``forward(bytes)`` with each piece as it arrives
    once every byte of it was checked (ZmtpError on the first byte that is not what a
    ZMTP 3 peer with the NULL mechanism sends)."""
    got = b""
    while len(got) < GREETING_SIZE:
        chunk = await reader.read(GREETING_SIZE - len(got))
        if not chunk:
            raise asyncio.IncompleteReadError(got, GREETING_SIZE)
        for i, value in enumerate(chunk):
            if not _greeting_byte_ok(len(got) + i, value):
                check_greeting((got + chunk).ljust(GREETING_SIZE, b"\0"))  # names why
                raise ZmtpError(f"byte {len(got) + i} of the greeting is {value:#x}")
        got += chunk
        await forward(chunk)


def parse_command(body: bytes) -> tuple[bytes, bytes]:
    """A command frame's body as (name, data) (ZmtpError if malformed)."""
    if not body or len(body) < 1 + body[0]:
        raise ZmtpError("a malformed ZMTP command")
    return body[1 : 1 + body[0]], body[1 + body[0] :]


def ready_properties(data: bytes) -> dict[bytes, bytes]:
    """The properties of a READY command (ZmtpError if malformed or repeated)."""
    props: dict[bytes, bytes] = {}
    at = 0
    while at < len(data):
        size = data[at]
        name = data[at + 1 : at + 1 + size]
        at += 1 + size
        if len(name) != size or at + 4 > len(data):
            raise ZmtpError("a malformed READY property")
        (vsize,) = struct.unpack(">I", data[at : at + 4])
        value = data[at + 4 : at + 4 + vsize]
        at += 4 + vsize
        if len(value) != vsize or name.lower() in props:
            raise ZmtpError("a malformed READY property")
        props[name.lower()] = value
    return props


def command(name: bytes, data: bytes = b"") -> bytes:
    """A whole command frame."""
    body = bytes((len(name),)) + name + data
    if len(body) < 256:
        return bytes((COMMAND, len(body))) + body
    return bytes((COMMAND | LONG,)) + struct.pack(">Q", len(body)) + body


def ready(socket_type: bytes, identity: bytes | None = None) -> bytes:
    """A READY command with these properties only."""
    props = [(b"Socket-Type", socket_type)]
    if identity is not None:
        props.append((b"Identity", identity))
    data = b"".join(bytes((len(k),)) + k + struct.pack(">I", len(v)) + v for k, v in props)
    return command(b"READY", data)


def checked_ready(body: bytes, socket_types: frozenset[bytes]) -> bytes:
    """The READY to forward for a peer's READY ``body``: the same socket type (one of
    ``socket_types``) and identity, written here (ZmtpError otherwise)."""
    name, data = parse_command(body)
    if name != b"READY":
        raise ZmtpError("the first command is not READY")
    props = ready_properties(data)
    socket_type = props.get(b"socket-type")
    if socket_type not in socket_types:
        raise ZmtpError(f"a {socket_type!r} socket where {sorted(socket_types)} was expected")
    identity = props.get(b"identity")
    if identity is not None and len(identity) > 255:
        raise ZmtpError("a routing id over 255 bytes")
    return ready(socket_type, identity)


def checked_heartbeat(body: bytes) -> bytes | None:
    """A PING or PONG written again (ZMTP 3.1 heartbeats), or None for any other
    command after the handshake, which is not forwarded."""
    try:
        name, data = parse_command(body)
    except ZmtpError:
        return None
    if name == b"PING" and 2 <= len(data) <= 2 + MAX_PING_CONTEXT:
        return command(name, data)
    if name == b"PONG" and len(data) <= MAX_PING_CONTEXT:
        return command(name, data)
    return None


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
