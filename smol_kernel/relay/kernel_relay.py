"""KernelRelay: the kernel's five ZMQ channels on the host, carried into the guest.

Per kernel the relay listens where the connection file says (tcp on ``ip:port``, or ipc on
``ip-port`` unix sockets). Every client connection gets its own stream into the VM (the
serial port's multiplexer under QEMU, vsock under libkrun) to the agent's port for that
channel, which the agent connects to the kernel's port on guest loopback.

Guarantees:
* Clients only get what the host parsed and wrote again (``message_pump.py``): what the
  guest sends is parsed as ZMTP (``zmtp.py``) and as Jupyter messages
  (``strict_message.py``); what does not parse is dropped and counted, what the output
  policy filters (``output_policy.py``) is rewritten, and every message is signed again
  with the kernel's key, so clients verify it as usual. Every client-to-guest byte passes
  unchanged (client bytes are framed too, so a connection can move: ``client_pump.py``).
  Without a policy (``trusted_outputs``) nothing is rewritten, but the parsing is the
  same.
* Bounded host memory: a direction moves at most one 1 MiB read at a time (a client's
  requests kept for a rewind: ``client_pump.MAX_KEPT_BYTES``) and waits for the other side
  to drain, except towards iopub clients, whose share of output the relay
  holds up to ``iopub_backlog`` bytes for the kernel as a whole; over it, output messages
  are dropped (busy/idle status never) and each client that missed some gets one stream
  line saying so. No message over ``MAX_MESSAGE_BYTES`` reaches a client.
* Any number of clients (tabs, consoles, nbclient) can connect at once; a guest that
  breaks ZMTP framing loses that one connection.
* Ports are bound (and held) in ``bind()`` before the VM boots, so no other process can take
  them; connections are only relayed after ``start_serving()``, once the kernel is up.
* With a gate, clients survive a change of VM (a rewind): ``hold_requests`` stops new
  shell requests between two messages, ``detach`` parks every connection, ``attach``
  moves each to a stream into the new VM (``client_pump.py``: handshakes replayed), and
  ``resend_unanswered`` gives the new kernel the requests the old one did not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..error_root import SmolKernelError
from ..guest.protocol import CHANNEL_PORTS
from .client_pump import Link, pump_client
from .message_pump import MessageGate, Progress, pump_frames, pump_messages
from .zmtp import ZmtpError

CHUNK = 64 * 1024
MOVE_TIMEOUT = 2.0  # seconds a connection may take to reach a message boundary to move
SUBSCRIBE_SETTLE = 0.05  # seconds for replayed subscriptions to reach the new guest's PUB
# A new client's first shell request waits (at most FIRST_REQUEST_WAIT seconds) until an
# iopub link of its own has subscribed: one that connected at most PAIRING_S before it, or
# after. Then FIRST_REQUEST_SETTLE for the subscription to reach the guest's PUB first.
FIRST_REQUEST_WAIT = 1.0
PAIRING_S = 0.25
FIRST_REQUEST_SETTLE = 0.01
log = logging.getLogger("smol_kernel.relay")
Opener = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class RelayError(SmolKernelError):
    """A channel could not be bound on the host."""


class KernelRelay:
    def __init__(
        self, transport: str, ip: str, ports: dict[str, int], gate: MessageGate | None = None
    ) -> None:
        """``gate``: the kernel's key, output policy and iopub backlog cap; None relays
        every byte as it is (only for kernels we never filter: tests, benchmarks), and
        then connections cannot move to another VM."""
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
        self._links: set[Link] = set()
        self._open_stream: Opener | None = None
        self._attached = asyncio.Event()  # clear while the kernel's VM is being replaced
        self._held = False  # new shell requests wait (a checkpoint or rewind is coming)
        self._subscribed = asyncio.Event()  # set (and replaced) when an iopub link subscribes
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
        self._open_stream = open_stream
        self._attached.set()
        for channel, sock in self._socks.items():

            async def on_client(reader, writer, channel=channel):
                if self.gate is None:
                    await self._relay(reader, writer, channel, open_stream)
                else:
                    await self._relay_link(reader, writer, channel)

            if self.transport == "tcp":
                server = await asyncio.start_server(on_client, sock=sock, limit=CHUNK)
            else:
                server = await asyncio.start_unix_server(on_client, sock=sock, limit=CHUNK)
            self._servers.append(server)

    async def _relay(self, c_reader, c_writer, channel: str, open_stream: Opener) -> None:
        """Byte for byte, both ways (no gate)."""
        task = asyncio.current_task()
        assert task is not None
        _no_delay(c_writer)
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
            down = asyncio.ensure_future(self._pump(g_reader, c_writer))
            # No half-close into the guest: when either side ends, end both.
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

    # ------------------------------------------------------------ movable connections
    async def _relay_link(self, c_reader, c_writer, channel: str) -> None:
        """A client connection that can move to another VM (see client_pump.py)."""
        task = asyncio.current_task()
        assert task is not None
        _no_delay(c_writer)
        link = Link(channel, c_reader, c_writer)
        link.on_subscribed = self._on_subscribed
        first: asyncio.Future | None = None
        self._tasks.add(task)
        self._writers.add(c_writer)
        try:
            await self._attached.wait()
            if not await self._connect(link, replay=False):
                return
            if channel == "shell":
                # Until its iopub has subscribed (or held with every shell link).
                link.flowing.clear()
                first = asyncio.ensure_future(self._after_subscription(link))
            self._links.add(link)
            self.connections += 1
            up = asyncio.ensure_future(pump_client(link))
            while True:  # until the client goes, or its guest stream ends without a move
                down = link.down_task
                assert down is not None
                done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                if up in done or link.down_task is down:
                    break  # (a move replaced down_task: carry on with the new one)
            for t in (up, link.down_task):
                if t is not None and not t.done():
                    t.cancel()
            await asyncio.gather(up, *(t for t in (link.down_task,) if t), return_exceptions=True)
            if up.done() and not up.cancelled() and isinstance(up.exception(), ZmtpError):
                log.warning("closing a %s connection: the client broke ZMTP: %s", channel,
                            up.exception())  # fmt: skip
        finally:
            if first is not None:
                first.cancel()
            self._links.discard(link)
            for w in (c_writer, link.g_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            self._tasks.discard(task)

    async def _after_subscription(self, shell: Link) -> None:
        """Let a new shell link's requests flow once an iopub link of the same client has
        subscribed: else the kernel's busy/idle for its first request go to no one, and
        jupyter_client asks again after 0.2 s. A client without iopub waits
        FIRST_REQUEST_WAIT once (counted from when its guest stream is open)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_REQUEST_WAIT
        while not any(link.channel == "iopub" and link.subscribed.is_set()
                      and link.created >= shell.created - PAIRING_S
                      for link in self._links):  # fmt: skip
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), left)  # (woken per subscription)
        else:
            await asyncio.sleep(FIRST_REQUEST_SETTLE)
        if not self._held:
            shell.flowing.set()

    def _on_subscribed(self) -> None:
        """An iopub link subscribed: wake the shell links waiting for one."""
        woken, self._subscribed = self._subscribed, asyncio.Event()
        woken.set()

    async def _connect(self, link: Link, replay: bool) -> bool:
        """Open a guest stream for ``link`` and start its guest-to-client pump; with
        ``replay`` the stream first gets the client's handshake (a moved connection)."""
        assert self._open_stream is not None and self.gate is not None
        try:
            g_reader, g_writer = await self._open_stream(CHANNEL_PORTS[link.channel])
        except (OSError, TimeoutError):
            return False  # guest gone: the client sees a closed connection and retries
        link.g_reader, link.g_writer = g_reader, g_writer
        self._writers.add(g_writer)
        if replay:
            g_writer.write(link.replay())
        link.down = Progress()
        if link.channel == "hb":
            pump = pump_frames(g_reader, link.c_writer, skip_handshake=replay,
                               progress=link.down, gate=self.gate)  # fmt: skip
        else:
            pump = pump_messages(
                g_reader, link.c_writer, link.channel, self.gate, skip_handshake=replay,
                progress=link.down, on_parent=link.answered if link.channel == "shell" else None,
            )  # fmt: skip
        link.down_task = asyncio.ensure_future(self._guarded(pump, link.channel))
        return True

    async def _guarded(self, pump, channel: str) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            try:
                await pump
            except ZmtpError as e:  # the guest's doing: this connection ends
                log.warning("closing a %s connection: the kernel broke ZMTP: %s", channel, e)

    def hold_requests(self) -> None:
        """New shell requests wait in the relay (between two messages) until released."""
        self._held = True
        for link in self._links:
            if link.channel == "shell":
                link.flowing.clear()

    def release(self) -> None:
        """Let every connection's client-to-guest bytes flow again."""
        self._held = False
        for link in self._links:
            link.flowing.set()

    async def wait_for_listener(self, timeout: float) -> bool:
        """Wait until a client listens on iopub (subscribed), ``timeout`` at most."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not any(link.channel == "iopub" and link.subscriptions for link in self._links):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def unanswered_requests(self) -> int:
        """Shell requests relayed to the kernel that it has not answered yet."""
        return sum(len(link.sent) for link in self._links)

    async def detach(self) -> int:
        """Stop every connection between two messages and cut it from its guest stream
        (the VM is about to go); new connections wait for ``attach``. A connection that
        cannot stop at a boundary is closed (its client reconnects). Returns how many
        stay, parked."""
        self._attached.clear()
        links = list(self._links)
        for link in links:
            link.flowing.clear()
        for link in links:
            try:
                await asyncio.wait_for(link.between.wait(), MOVE_TIMEOUT)
            except (TimeoutError, asyncio.TimeoutError):
                self._drop(link)
                continue
            if not link.ready_seen:  # its handshake is not all here: nothing to replay
                self._drop(link)
        for link in list(self._links):
            task, link.down_task = link.down_task, asyncio.ensure_future(asyncio.sleep(1e9))
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if link.g_writer is not None:
                self._writers.discard(link.g_writer)
                link.g_writer.close()
                link.g_writer = None
            if link.down.partial:  # the client has part of a message: it cannot move
                self._drop(link)
        return len(self._links)

    async def attach(self, open_stream: Opener) -> int:
        """Move every parked connection to a stream opened with ``open_stream`` (the new
        VM), replaying its handshake; client bytes stay held until ``release``. Returns how
        many moved."""
        self._open_stream = open_stream
        for link in list(self._links):
            parked = link.down_task
            if not await self._connect(link, replay=True):
                self._drop(link)
            if parked is not None:
                parked.cancel()
        # The new guest answers each handshake before it gets anything else: then iopub
        # links get their subscriptions, and a moment to take effect before the kernel
        # speaks (what it publishes before that is lost, as for any new subscriber).
        links = list(self._links)
        waits = [asyncio.ensure_future(link.down.greeted.wait()) for link in links]
        if waits:
            await asyncio.wait(waits, timeout=MOVE_TIMEOUT)
        subscribed = False
        for link, wait in zip(links, waits, strict=True):
            if not wait.done():
                wait.cancel()
                self._drop(link)
            elif link.subscriptions and link.g_writer is not None:
                link.g_writer.write(b"".join(link.subscriptions))
                subscribed = True
        if subscribed:
            await asyncio.sleep(SUBSCRIBE_SETTLE)
        self._attached.set()
        return len(self._links)

    def resend_unanswered(self, skip: set[str]) -> int:
        """Write the shell requests the old kernel did not answer (but ``skip``) to the new
        kernel, in the order they came. Returns how many."""
        count = 0
        for link in self._links:
            if link.channel != "shell" or link.g_writer is None:
                continue
            for msg_id in skip:
                link.forget(msg_id)
            for data in link.unanswered():
                link.g_writer.write(data)
                count += 1
            if link.lost:
                log.warning("%d request(s) too large to keep were not sent to the rewound "
                            "kernel", link.lost)  # fmt: skip
                link.lost = 0
        return count

    def _drop(self, link: Link) -> None:
        self._links.discard(link)
        link.c_writer.close()
        if link.g_writer is not None:
            link.g_writer.close()

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


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP; ours are not,
        # and Nagle's algorithm would hold a message written after another for 40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
