"""A fake VM backend: the host side of a kernel start (planning, launch, relay, control
socket, metrics, audit) in tests that boot no VM.

``FakeVm`` is no VM. Its "guest" is a fake agent in this process that speaks
``guest/protocol.py`` and starts a *local* ipykernel with the connection key it is given;
the VM's channel streams go to that kernel's ports. It lives only in tests/: nothing in
smol_kernel can select it (a kernel outside a VM is what smol-kernel never runs). Use it
with ``fake_backend(monkeypatch)``, which makes the planner choose it.

What a test may ask of the fake guest, through the kernelspec's environment:
``FAKE_GUEST_EXIT=N``: the kernel exits with status N before it is ready, saying "boom".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from smol_kernel.guest import protocol as P
from smol_kernel.vm.base import BackendStatus, Vm, VmBackend
from smol_kernel.vm.select import Selection
from smol_kernel.vm.spec import Isolation, VmSpec


class FakeVm(Vm):
    streams_wait_for_guest = True  # the fake agent listens from the start

    def __init__(self, spec: VmSpec) -> None:
        self.id = "fake-" + uuid.uuid4().hex[:8]
        self.spec = spec
        self.isolation = Isolation.TCG
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="smol-fake-vm-"))
        self.console_log.write_text("fake guest\n")
        self.kernel: AsyncKernelManager | None = None
        self.requests: list[dict] = []  # every agent request the host sent, in order
        self._status: int | None = None
        self._agents: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def pid(self) -> int | None:
        return None

    def poll(self) -> int | None:
        return self._status

    async def wait(self, timeout: float | None = None) -> int:
        async def ended() -> int:
            while self._status is None:
                await asyncio.sleep(0.02)
            return self._status

        return await asyncio.wait_for(ended(), timeout)

    def terminate(self) -> None:
        self._stop(0)

    def kill(self) -> None:
        self._stop(-9)

    def _stop(self, status: int) -> None:
        if self._status is None:
            self._status = status
            self._spawn(self._stop_kernel())

    async def _stop_kernel(self) -> None:
        km, self.kernel = self.kernel, None
        if km is not None and km.has_kernel:
            await km.shutdown_kernel(now=True)
        for writer in self._agents:
            writer.close()

    async def close(self) -> None:
        self._stop(-9)
        await self._stop_kernel()
        for task in list(self._tasks):
            task.cancel()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    async def open_stream(self, port: int, timeout: float = 5.0):
        if self._status is not None:
            raise ConnectionRefusedError(f"fake VM {self.id} has stopped")
        if port == P.CONTROL_PORT:
            host_end, guest_end = socket.socketpair()
            reader, writer = await asyncio.open_connection(sock=guest_end)
            self._agents.append(writer)
            self._spawn(self._serve_agent(reader, writer))
            return await asyncio.open_connection(sock=host_end)
        channel = {v: k for k, v in P.CHANNEL_PORTS.items()}.get(port)
        if channel is None or self.kernel is None:
            raise ConnectionRefusedError(f"nobody listens on port {port} of {self.id}")
        local = self.kernel.get_connection_info()[f"{channel}_port"]
        return await asyncio.open_connection("127.0.0.1", int(local))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the fake agent
    async def _serve_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                req = P.decode(line)
                self.requests.append(req)
                try:
                    fields = await self._handle(req, writer)
                    msg = {"id": req.get("id"), "ok": True, **fields}
                except Exception as e:  # an agent reports, it does not die
                    msg = {"id": req.get("id"), "ok": False, "error": f"{type(e).__name__}: {e}"}
                writer.write(P.encode(msg))
                await writer.drain()

    async def _handle(self, req: dict, writer: asyncio.StreamWriter) -> dict:
        op = req.get("op")
        if op == P.OP_HELLO:
            return {"protocol": P.PROTOCOL_VERSION, "kernel": "none"}
        if op == P.OP_START_KERNEL:
            env = req.get("env") or {}
            if (status := env.get("FAKE_GUEST_EXIT")) is not None:
                exited = {"event": P.EV_KERNEL_EXITED, "status": int(status), "tail": "boom\n"}
                self._spawn(self._event(writer, exited))
                return {"pid": 0}
            km = AsyncKernelManager(kernel_name="python3")
            key = str((req.get("connection") or {}).get("key", ""))
            km.session.key = key.encode()
            await km.start_kernel()
            self.kernel = km
            self._spawn(self._event(writer, {"event": P.EV_KERNEL_READY, "pid": 0}))
            return {"pid": 0}
        if op == P.OP_SIGNAL:
            if self.kernel is not None:
                await self.kernel.signal_kernel(int(req["signum"]))
            return {}
        if op in (P.OP_PING, P.OP_POWEROFF):
            return {}
        raise ValueError(f"the fake guest does not do {op!r}")

    @staticmethod
    async def _event(writer: asyncio.StreamWriter, event: dict) -> None:
        await asyncio.sleep(0.01)  # after the reply, as the real agent sends it
        writer.write(P.encode(event))
        await writer.drain()


class FakeBackend(VmBackend):
    name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.vms: list[FakeVm] = []

    def check(self, image: str = "default") -> BackendStatus:
        return BackendStatus("fake", True, Isolation.TCG, "a test double: no VM")

    async def start(self, spec: VmSpec) -> Vm:  # type: ignore[override]
        spec.validate()
        vm = FakeVm(spec)
        self.vms.append(vm)
        return vm


def fake_backend(monkeypatch) -> FakeBackend:
    """Make every kernel planned in this test start on a new FakeBackend."""
    backend = FakeBackend()
    status = backend.check()

    def select(*args: object, **kwargs: object) -> Selection:
        return Selection(backend, status, ["fake: a test double"])

    monkeypatch.setattr("smol_kernel.planning.select_backend", select)
    return backend


def leftover_runtime_dirs() -> list[str]:
    return [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("smol-fake-vm-")]
