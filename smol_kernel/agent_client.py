"""Host side of the guest agent protocol (see ``guest/protocol.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable

from .guest import protocol as P
from .shown import escaped
from .vm.base import Vm, VmError


class AgentError(VmError):
    """The guest agent refused a request or went away. ``errno``: the guest's OSError
    errno when that is why the request failed (e.g. a missing file), else None."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class GuestAgent:
    """A control connection to the agent of one VM."""

    def __init__(self, vm: Vm, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.vm = vm
        self._reader, self._writer = reader, writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.hello: dict = {}
        self.kernel_prepared = asyncio.Event()
        self.kernel_ready = asyncio.Event()
        self.kernel_exited = asyncio.Event()
        self.kernel_exit_status: int | None = None
        self.kernel_output_tail = ""
        self.closed = asyncio.Event()
        # Called with each request a magic in the kernel made (``kernel_request``): the
        # guest's words, for the host to check and answer with ``kernel_reply``.
        self.on_kernel_request: Callable[[dict], None] | None = None
        self._task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(cls, vm: Vm, timeout: float) -> GuestAgent:
        """Wait until the agent listens (the guest has booted), then say hello.

        Raises VmError with the tail of the guest console if the VM dies or the agent does
        not answer within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        # Wait for the agent's line on the console before connecting: vsock connects to a
        # port nobody listens on yet are wasted, and hundreds of them during boot once left
        # vhost-device-vsock unable to connect that port at all. (A VM whose streams wait
        # for the guest themselves -- QEMU's serial port -- needs no such wait.)
        while not vm.streams_wait_for_guest and vm.poll() is None:
            if P.READY_LINE in vm.console_tail(8192).encode() or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        while True:
            if (status := vm.poll()) is not None:
                raise VmError(
                    f"VM {vm.id} exited ({status}) before its agent answered. "
                    f"Guest console:\n{vm.console_tail()}"
                )
            agent = None
            try:
                reader, writer = await vm.open_stream(P.CONTROL_PORT, timeout=2.0)
                agent = cls(vm, reader, writer)
                # libkrun may accept on the host before the guest listens, then reset:
                # only an answered hello counts as ready.
                agent.hello = await agent.request(P.OP_HELLO, timeout=5.0)
                if agent.hello.get("protocol") != P.PROTOCOL_VERSION:
                    await agent.close()
                    raise VmError(
                        f"VM {vm.id}: its guest agent speaks protocol "
                        f"{escaped(str(agent.hello.get('protocol'))[:20])}, this smol-kernel "
                        f"speaks {P.PROTOCOL_VERSION}: the image {vm.spec.image!r} was built "
                        "by another version. Rebuild it with the 'smol-kernel image build' "
                        "command that made it."
                    )
                if agent.hello.get("kernel") == "prepared":  # a clone of a saved VM
                    agent.kernel_prepared.set()
                return agent
            except (OSError, AgentError, TimeoutError):
                if agent is not None:
                    await agent.close()
            if time.monotonic() >= deadline:
                raise VmError(
                    f"VM {vm.id}: guest agent did not answer within {max(timeout, 0):.0f}s. "
                    f"Guest console:\n{vm.console_tail()}"
                )
            await asyncio.sleep(0.1)

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                msg = P.decode(line)
                if "event" in msg:
                    self._on_event(msg)
                elif (fut := self._pending.pop(msg.get("id"), None)) and not fut.done():
                    fut.set_result(msg)
        except (OSError, P.ProtocolError, asyncio.IncompleteReadError, ValueError, TypeError,
                ArithmeticError):  # fmt: skip
            pass  # the guest broke the protocol (e.g. an unhashable id): this link is over
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(AgentError(f"VM {self.vm.id}: agent connection closed"))
            self._pending.clear()

    def _on_event(self, msg: dict) -> None:
        if msg["event"] == P.EV_KERNEL_READY:  # (guest-written: int()/str() may raise)
            self.kernel_ready.set()
        elif msg["event"] == P.EV_KERNEL_PREPARED:
            self.kernel_prepared.set()
        elif msg["event"] == P.EV_KERNEL_EXITED:
            self.kernel_exit_status = int(msg.get("status", -1))
            self.kernel_output_tail = str(msg.get("tail", ""))
            self.kernel_exited.set()
        elif msg["event"] == P.EV_KERNEL_REQUEST:
            request = msg.get("request")
            if isinstance(request, dict) and self.on_kernel_request is not None:
                self.on_kernel_request(request)

    async def request(self, op: str, timeout: float = 10.0, **fields) -> dict:
        if self.closed.is_set():
            raise AgentError(f"VM {self.vm.id}: agent connection is closed")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(P.encode({"op": op, "id": rid, **fields}))
        await self._writer.drain()
        try:
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            errno = reply.get("errno")
            raise AgentError(f"guest agent: {op} failed: {reply.get('error')}",
                             errno if isinstance(errno, int) else None)  # fmt: skip
        return reply

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
