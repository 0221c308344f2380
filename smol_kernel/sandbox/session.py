"""``KernelSession``: the one kernel behind an ``AsyncSandbox``, under a real
``jupyter_client`` manager and client.

It starts the kernel (with the sandbox's in-memory kernelspec, so the same
``SmolVMProvisioner`` and warm pool as the installed kernelspec), connects one client with
bounded queues, replaces a kernel that died or ignored an interrupt (in the background;
``ready()`` waits for it), and reads one execution's messages. A killed session stays
killed: every later call raises ``SandboxError``.
"""

from __future__ import annotations

import asyncio
import time
from queue import Empty
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from ..checkpoint import Checkpoint
from ..error_root import SmolKernelError
from ..provisioner import CLIENT_RCVHWM, SmolVMProvisioner
from ..relay.message_pump import MAX_MESSAGE_BYTES, RELAY_SESSION
from .execution import OutputCollector


class SandboxError(SmolKernelError, RuntimeError):
    """The sandbox cannot do what was asked (killed, failed to start, agent refused)."""


class _OneKernelSpec(KernelSpecManager):
    """Serves the sandbox's in-memory kernelspec under any name; nothing on disk."""

    def __init__(self, spec: KernelSpec, **kwargs: Any):
        super().__init__(**kwargs)
        self._spec = spec

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self._spec


class KernelSession:
    """One sandbox's kernel: its manager (``km``), client (``kc``) and ZMQ context."""

    def __init__(self, spec: KernelSpec, startup_timeout: float) -> None:
        self.spec, self.startup_timeout = spec, startup_timeout
        self.km: AsyncKernelManager | None = None
        self.kc: Any = None
        self._zmq: zmq.asyncio.Context | None = None
        self._replacing: asyncio.Future | None = None
        self.killed = False

    @property
    def provisioner(self) -> SmolVMProvisioner | None:
        prov = self.km.provisioner if self.km is not None else None
        return prov if isinstance(prov, SmolVMProvisioner) else None

    async def start(self, restore_from: Checkpoint | None = None) -> None:
        """Boot the VM and wait until its kernel answers; SandboxError (with the
        provisioner's reason) if it cannot, and nothing is left running then."""
        if self.killed:
            raise SandboxError("this sandbox was killed; create a new one")
        if self.km is not None:
            return
        km = AsyncKernelManager(
            kernel_name="smolvm-sandbox", kernel_spec_manager=_OneKernelSpec(self.spec)
        )
        try:
            await km.start_kernel(**({"restore_from": restore_from} if restore_from else {}))
            self.km = km
            await self._connect()
        except BaseException as e:
            self.km = None
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
            if isinstance(e, Exception):
                raise SandboxError(f"the sandbox did not start: {e}") from e
            raise

    async def _connect(self) -> None:
        assert self.km is not None
        if self._zmq is None:
            self._zmq = zmq.asyncio.Context()
            self._zmq.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # default for its sockets
            # Between calls nothing reads iopub: the relay holds (and drops) the backlog.
            self._zmq.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
        kc = self.km.client(context=self._zmq)
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=self.startup_timeout)
        except BaseException:
            kc.stop_channels()
            raise
        self.kc = kc

    def _disconnect(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None

    async def ready(self) -> None:
        """Started, and any replacement kernel up; SandboxError once killed."""
        if self.killed:
            raise SandboxError("this sandbox was killed; create a new one")
        if self.km is None:
            await self.start()
        if self._replacing is not None:
            replacing, self._replacing = self._replacing, None
            try:
                await replacing
            except Exception as e:
                raise SandboxError(f"the sandbox's replacement kernel did not start: {e}") from e

    async def is_running(self) -> bool:
        if self.killed or self.km is None:
            return False
        if self._replacing is not None and not self._replacing.done():
            return True  # a fresh kernel is on its way
        return await self.km.is_alive()

    async def replace(self) -> None:
        """A fresh kernel in a fresh VM, connected."""
        assert self.km is not None
        self._disconnect()
        await self.km.restart_kernel(now=True)
        await self._connect()

    def replace_soon(self) -> None:
        self._replacing = asyncio.ensure_future(self.replace())

    async def kill(self) -> None:
        """Stop the kernel and destroy its VM at once. Idempotent."""
        self.killed = True
        if self._replacing is not None:  # let it finish: a boot cut short could leave a VM
            await asyncio.gather(self._replacing, return_exceptions=True)
        self._disconnect()
        km, self.km = self.km, None
        if km is not None and km.has_kernel:
            await km.shutdown_kernel(now=True)
        if self._zmq is not None:
            self._zmq.destroy(linger=0)
            self._zmq = None

    async def pump(self, msg_id: str, collector: OutputCollector, until: float) -> str:
        """Feed this execution's IOPub messages to ``collector`` until the kernel is idle
        again (``idle``), ``until`` passes (``timeout``) or the kernel dies (``died``)."""
        assert self.km is not None
        while (left := until - time.monotonic()) > 0:
            try:
                msg = await self.kc.get_iopub_msg(timeout=min(left, 1.0))
            except Empty:
                if not await self.km.is_alive():
                    return "died"
                continue
            ours = msg["parent_header"].get("msg_id") == msg_id
            relay_note = msg["header"].get("session") == RELAY_SESSION  # dropped output
            if (ours or relay_note) and collector.feed(msg):
                return "idle"
        return "died" if not await self.km.is_alive() else "timeout"

    async def reply(self, msg_id: str) -> dict:
        """The shell reply to ``msg_id`` (waiting 10 s at most; {} if none)."""
        deadline = time.monotonic() + 10
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await self.kc.get_shell_msg(timeout=left)
            except Empty:
                break
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]
        return {}
