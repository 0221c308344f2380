"""Host -> guest vsock streams through vhost-device-vsock's unix socket.

vhost-device-vsock exposes the guest's vsock ports on one host unix socket ("uds path"):
connect, send ``CONNECT <port>\\n``, read ``OK <host-port>\\n``, then the connection is a
plain byte stream to the guest. If nothing listens on the guest port the daemon closes the
connection instead of answering OK.
"""

from __future__ import annotations

import asyncio
from pathlib import Path


async def open_vsock_stream(
    uds_path: Path, port: int, timeout: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream to guest vsock ``port``; raise ConnectionRefusedError if nobody listens."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(str(uds_path), limit=1 << 20), timeout
    )
    try:
        writer.write(f"CONNECT {port}\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except BaseException:
        writer.close()
        raise
    if not line.startswith(b"OK "):
        writer.close()
        raise ConnectionRefusedError(f"guest vsock port {port}: no listener ({line!r})")
    return reader, writer
