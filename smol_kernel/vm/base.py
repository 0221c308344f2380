"""The VM interface every backend implements.

A ``VmBackend`` turns a ``VmSpec`` into a running ``Vm``. The contract:

* ``start`` returns once the VMM process runs; the guest may still be booting. Readiness is
  the guest agent's business (``GuestAgent.connect``), not the backend's.
* Every VM has its own runtime directory (sockets, writable overlay, console log) that
  nothing else uses; ``close()`` kills what is left and removes it. ``close()`` is
  idempotent and safe to call from any state.
* The VMM and its helper processes die with the process that started them (parent-death
  signal), and leftovers of a crashed owner are reaped by ``reap_orphans``.
* ``isolation`` is what the VM really got -- never a guess.
* ``open_stream(port)`` opens a byte stream to a guest vsock port, host -> guest.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..error_root import SmolKernelError
from ..image.store import GuestImage, ImageNotFound
from .spec import Isolation, VmSpec


class VmError(SmolKernelError):
    """A VM could not be started or used; the message says why."""


class BackendUnavailable(VmError):
    """The backend cannot run VMs on this host; ``reason`` and ``fix`` say why and what to do."""

    def __init__(self, backend: str, reason: str, fix: str = "") -> None:
        self.backend, self.reason, self.fix = backend, reason, fix
        super().__init__(f"{backend}: {reason}" + (f" -- {fix}" if fix else ""))


@dataclass
class BackendStatus:
    """What ``VmBackend.check`` found."""

    backend: str
    available: bool
    isolation: Isolation | None
    reason: str
    fix: str = ""
    steps: list[str] | None = None


class Vm(abc.ABC):
    """A running (or finished) microVM."""

    id: str
    spec: VmSpec
    isolation: Isolation
    runtime_dir: Path
    # open_stream itself waits until the guest can take streams (no readiness line needed)
    streams_wait_for_guest: bool = False

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """PID of the VMM process (None once reaped)."""

    @property
    def console_log(self) -> Path:
        return self.runtime_dir / "console.log"

    @abc.abstractmethod
    def poll(self) -> int | None:
        """None while the VMM runs, else its exit status. Never blocks."""

    @abc.abstractmethod
    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the VMM to exit; raise TimeoutError if it does not within ``timeout``."""

    @abc.abstractmethod
    def terminate(self) -> None:
        """Ask the VMM to stop (the guest gets no say)."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the VMM now."""

    @abc.abstractmethod
    async def open_stream(
        self, port: int, timeout: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to guest vsock ``port``; ConnectionRefusedError if nobody listens."""

    def set_label(self, label: str, pooled: bool = False, ready: bool = False) -> None:
        """What ``smol-kernel ps`` shows for this VM: the kernel it serves, or that it is a
        warm-pool VM still booting, or (``ready``) waiting for a kernel."""
        self.spec = dataclasses.replace(self.spec, label=label)

    @abc.abstractmethod
    async def close(self) -> None:
        """Kill the VM if it runs, stop its helpers, remove its runtime dir. Idempotent."""

    def console_tail(self, max_bytes: int = 4096) -> str:
        """The last ``max_bytes`` of the console log."""
        return read_tail(self.console_log, max_bytes)


def read_tail(path: Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a guest-written file: read as text, bounded, never through
    a link; "" if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    with open(fd, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - max_bytes))
        return f.read(max_bytes).decode("utf-8", "replace")


class VmBackend(abc.ABC):
    """Starts VMs of one kind (QEMU, libkrun)."""

    name: str = ""

    def __init__(self) -> None:
        self._checked: dict[str, tuple[str, BackendStatus]] = {}

    @abc.abstractmethod
    def check(self, image: str = "default") -> BackendStatus:
        """Can this backend run VMs here, and with which isolation? Must not raise."""

    def remember(self, image: str, status: BackendStatus) -> None:
        """Keep a successful check (the one that chose this backend) for its starts, as
        long as the image is the build it checked (a rebuilt image is checked again)."""
        try:
            build = GuestImage.load(image).build_id
        except (ImageNotFound, ValueError):
            return
        if status.available and status.isolation is not None:
            self._checked[image] = (build, status)

    async def status_for(self, image: GuestImage) -> BackendStatus:
        """The isolation a VM of ``image`` (as loaded for this start) gets here, checked
        once per backend object and build of the image; BackendUnavailable if none."""
        held = self._checked.get(image.name)
        if held is not None and held[0] == image.build_id:
            return held[1]
        status = await asyncio.to_thread(self.check, image.name)
        if not status.available or status.isolation is None:
            raise BackendUnavailable(self.name, status.reason, status.fix)
        self._checked[image.name] = (image.build_id, status)
        return status

    @abc.abstractmethod
    async def start(self, spec: VmSpec) -> Vm:
        """Start a VM for ``spec``; raise VmSpecError, BackendUnavailable or VmError.

        On failure nothing is left behind (no process, socket or directory).
        """
