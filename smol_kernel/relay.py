"""KernelRelay: the kernel's five ZMQ channels on the host, carried into the guest over vsock.

Per kernel the relay listens where the connection file says (tcp on ``ip:port``, or ipc on
``ip-port`` unix sockets). Every client connection gets its own vsock stream to the agent's
port for that channel, which the agent connects to the kernel's port on guest loopback.

Guarantees:
* Clients only see what the output policy allows (``output_policy.py``): what the guest
  sends on iopub, shell and control is parsed as ZMTP (``zmtp.py``), each message that
  carries a MIME bundle or a URL is rewritten by the policy and signed again with the
  kernel's key, so clients verify it as usual. Client-to-guest bytes, stdin and heartbeat
  are relayed byte for byte. Without a policy (``trusted_outputs``) all of it is.
* Bounded host memory: a direction moves at most one 1 MiB read at a time and waits for
  the other side to drain, except towards iopub clients, whose share of output the relay
  holds up to ``iopub_backlog`` bytes for the kernel as a whole; over it, output messages
  are dropped (busy/idle status never) and each client that missed some gets one stream
  line saying so. No message over ``MAX_MESSAGE_BYTES`` reaches a client.
* Any number of clients (tabs, consoles, nbclient) can connect at once; a guest that
  breaks ZMTP framing loses that one connection.
* Ports are bound (and held) in ``bind()`` before the VM boots, so no other process can take
  them; connections are only relayed after ``start_serving()``, once the kernel is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from .guest.protocol import CHANNEL_PORTS
from .message_pump import MessageGate, pump_messages
from .zmtp import ZmtpError

CHUNK = 64 * 1024
FILTERED_CHANNELS = ("iopub", "shell", "control")
log = logging.getLogger("smol_kernel.relay")
Opener = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class RelayError(Exception):
    """A channel could not be bound on the host."""


class KernelRelay:
    def __init__(
        self, transport: str, ip: str, ports: dict[str, int], gate: MessageGate | None = None
    ) -> None:
        """``gate``: the kernel's key, output policy and iopub backlog cap; None relays
        every byte as it is (only for kernels we never filter: tests, benchmarks)."""
        if transport not in ("tcp", "ipc"):
            raise RelayError(f"unsupported transport {transport!r} (use tcp or ipc)")
        missing = set(CHANNEL_PORTS) - set(ports)
        if missing:
            raise RelayError(f"no port for channel(s) {', '.join(sorted(missing))}")
        self.transport, self.ip, self.ports = transport, ip, dict(ports)
        self.gate = gate
        self._socks: dict[str, socket.socket] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0  # total client connections relayed, for tests and ps
        self.peak_buffered = 0  # largest write buffer seen on any relayed stream, bytes

    def _ipc_path(self, channel: str) -> Path:
        return Path(f"{self.ip}-{self.ports[channel]}")

    def bind(self) -> None:
        """Bind and listen on all five channels now; raise RelayError if one is taken."""
        try:
            for channel in CHANNEL_PORTS:
                if self.transport == "tcp":
                    family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
                    s = socket.socket(family, socket.SOCK_STREAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((self.ip, self.ports[channel]))
                else:
                    path = self._ipc_path(channel)
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.bind(str(path))
                    os.chmod(path, 0o600)
                s.listen(64)
                s.setblocking(False)
                self._socks[channel] = s
        except OSError as e:
            self._close_sockets()
            where = f"{self.ip}:{self.ports[channel]}" if self.transport == "tcp" else str(
                self._ipc_path(channel))  # fmt: skip
            raise RelayError(f"cannot listen for the {channel} channel on {where}: {e}") from e

    async def start_serving(self, open_stream: Opener) -> None:
        for channel, sock in self._socks.items():

            async def on_client(reader, writer, channel=channel):
                await self._relay(reader, writer, channel, open_stream)

            if self.transport == "tcp":
                server = await asyncio.start_server(on_client, sock=sock, limit=CHUNK)
            else:
                server = await asyncio.start_unix_server(on_client, sock=sock, limit=CHUNK)
            self._servers.append(server)

    async def _relay(self, c_reader, c_writer, channel: str, open_stream: Opener) -> None:
        task = asyncio.current_task()
        assert task is not None
        sock = c_writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP; ours are not,
            # and Nagle's algorithm would hold a message written after another for 40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._tasks.add(task)
        self._writers.add(c_writer)
        g_writer = None
        try:
            try:
                g_reader, g_writer = await open_stream(CHANNEL_PORTS[channel])
            except (OSError, TimeoutError):
                return  # guest gone: the client sees a closed connection and retries
            self._writers.add(g_writer)
            self.connections += 1
            up = asyncio.ensure_future(self._pump(c_reader, g_writer))
            if self.gate is not None and (channel == "iopub" or (
                channel in FILTERED_CHANNELS and self.gate.policy is not None)):  # fmt: skip
                down = asyncio.ensure_future(self._pump_messages(g_reader, c_writer, channel))
            else:
                down = asyncio.ensure_future(self._pump(g_reader, c_writer))
            # No half-close across vsock: when either side ends, end both.
            _, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for w in (c_writer, g_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            self._tasks.discard(task)

    def _close_sockets(self) -> None:
        for channel, s in self._socks.items():
            s.close()
            if self.transport == "ipc":
                with contextlib.suppress(OSError):
                    self._ipc_path(channel).unlink()
        self._socks.clear()

    async def close(self) -> None:
        """Stop listening, drop every relayed connection, remove ipc socket files."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        self._close_sockets()
        for w in list(self._writers):
            w.close()
        # Closing the transports ends each relay task by itself; cancelling them instead
        # makes asyncio's stream callback log a spurious CancelledError.
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for t in pending:
                t.cancel()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                writer.write(data)
                self.peak_buffered = max(
                    self.peak_buffered, writer.transport.get_write_buffer_size()
                )
                await writer.drain()

    async def _pump_messages(self, reader, writer, channel: str) -> None:
        assert self.gate is not None
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            try:
                await pump_messages(reader, writer, channel, self.gate)
            except ZmtpError as e:  # the guest's doing: this connection ends
                log.warning("closing a %s connection: the kernel broke ZMTP: %s", channel, e)
