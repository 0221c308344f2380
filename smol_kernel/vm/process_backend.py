"""The start skeleton of a backend whose VM is one host process (QEMU, the libkrun
launcher): what every start does, in one place.

``ProcessBackend.start`` guarantees, for every backend built on it:

* the spec is valid and the backend can run it (checked once per backend object and build
  of the image: the check that chose the backend is not repeated for each VM it starts);
* shared folders are opened and checked again just before the VMM gets them as
  descriptors, so no rename or symlink since planning can redirect a share;
* the network, when asked for, is the guarded passt link (``network.py``);
* on any failure nothing is left: the VMM and helpers are stopped, the runtime dir is
  removed, every descriptor is closed. (A cancellation while a process is being spawned
  in a worker thread can lose that process: callers shield starts, see ``pool.py``.)

A backend supplies ``_spawn``: lay out its files, start the VMM, return its ``ProcessVm``
once the VMM has really started. Reaping a crashed owner's VMs is the caller's job
(``reap_orphans``: once per kernel start and per warm-pool refill), not each VM's.
"""

from __future__ import annotations

import abc
import asyncio
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..image.store import GuestImage
from .base import VmBackend
from .network import start_network
from .process import ProcessVm, RuntimeDir, spawn, stop_processes
from .share import open_share
from .spec import Isolation, VmSpec


@dataclass
class Boot:
    """One start in progress: what the skeleton made, and what the backend adds to be
    cleaned up: ``vmm`` and ``cleanups`` if the start fails, ``fds`` in any case."""

    spec: VmSpec
    image: GuestImage
    isolation: Isolation
    rt: RuntimeDir
    share_fds: list[int] = field(default_factory=list)
    net_procs: list[subprocess.Popen] = field(default_factory=list)
    net_sock: socket.socket | None = None
    vmm: subprocess.Popen | None = None
    fds: list[int] = field(default_factory=list)  # closed once the VMM has its copies
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def net_fd(self) -> int | None:
        return self.net_sock.fileno() if self.net_sock is not None else None


class ProcessBackend(VmBackend):
    """A ``VmBackend`` whose ``start`` is the skeleton above; see the module docstring."""

    async def start(self, spec: VmSpec, **options) -> ProcessVm:
        """Start a VM for ``spec``; ``options`` are the backend's own (QEMU: a template or
        a snapshot to restore). Returns once the VMM runs (see ``_spawn``)."""
        spec.validate()
        image = GuestImage.load(spec.image)
        status = await self.status_for(image)
        assert status.isolation is not None
        self._validate(spec, **options)
        boot = Boot(spec, image, status.isolation, RuntimeDir.create())
        try:
            for share in spec.shares:
                boot.share_fds.append(open_share(share))
            if spec.network:
                boot.net_procs, boot.net_sock = await asyncio.to_thread(
                    start_network, spawn, boot.rt.path, spec.allow_hosts, spec.dns,
                    spec.private_answers, Path(spec.egress_carry) if spec.egress_carry else None,
                )  # fmt: skip
            return await self._spawn(boot, **options)
        except BaseException:
            stop_processes((boot.vmm, *boot.net_procs))
            for cleanup in boot.cleanups:
                await cleanup()
            boot.rt.remove()
            raise
        finally:
            if boot.net_sock is not None:
                boot.net_sock.close()  # the VMM has its own copy
            for fd in (*boot.share_fds, *boot.fds):
                os.close(fd)

    def _validate(self, spec: VmSpec, **options) -> None:
        """Refuse, before anything is made, what this backend cannot give ``spec``."""

    @abc.abstractmethod
    async def _spawn(self, boot: Boot, **options) -> ProcessVm:
        """Lay out the VM's files in ``boot.rt``, start the VMM (``boot.vmm`` as soon as
        it exists), record its state, and return its VM once the VMM has started (VmError
        with the VMM's own words if it did not)."""
