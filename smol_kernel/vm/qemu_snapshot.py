"""Saved QEMU VMs: the folder a template or a checkpoint is saved to, and the helpers
``qemu.py``'s ``QemuBackend`` saves and restores with.

``Snapshot`` names a saved VM's files (``state``, ``ram``, ``overlay.ext4``, ``vm.json``,
``console.log``); ``NEW_FILE`` is how each of them is created (new, never followed).
``copy_sparse`` copies a disk with its holes; ``write_ram`` writes a guest's memory to a
file, leaving zero pages as holes. ``Receiver`` is the QEMU a checkpoint of a VM without a
balloon streams its memory into (see ``qemu.py``'s docstring, "Checkpoints").
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..image.store import GuestImage
from .base import VmError
from .process import RuntimeDir, owner_state, proc_start_time, spawn, stop_processes
from .qmp import Qmp, QmpError

if TYPE_CHECKING:
    from .qemu import QemuBackend, QemuVm

MIGRATION_TIMEOUT = 60.0
RECEIVER_START_TIMEOUT = 300.0  # its RAM is allocated first: ~1 s per GiB here

# A snapshot's files are new files in a fresh private folder: never follow, never reuse.
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Snapshot:
    """A VM saved to a folder: ``state`` (QEMU's device state: tiny for a template, whose
    memory is the ``ram`` file clones map; all of the memory for a checkpoint, which has no
    ``ram``), ``overlay`` (its writable disk as it was when saved) and ``vm.json`` (the
    devices a VM restoring it must have)."""

    folder: Path

    @property
    def ram(self) -> Path:
        return self.folder / "ram"

    @property
    def streamed(self) -> bool:
        """The memory is in ``state`` (a checkpoint), not in a file to map (a template)."""
        return not self.ram.exists()

    @property
    def devices(self) -> Path:
        return self.folder / "vm.json"

    @property
    def balloon(self) -> bool:
        """Whether the saved VM had a balloon (a restoring VM needs the same devices)."""
        try:
            return bool(json.loads(self.devices.read_text()).get("balloon"))
        except (OSError, ValueError, AttributeError):
            return False

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def overlay(self) -> Path:
        return self.folder / "overlay.ext4"

    @property
    def console(self) -> Path:
        return self.folder / "console.log"


class Receiver:
    """A QEMU with a running VM's devices whose guest never runs: it takes that VM's memory
    over a socket into a memfd of ours (its RAM, shared: what arrives is in the memfd) and
    saves its devices with ``x-ignore-shared``; the memfd's pages are then written to the
    checkpoint's RAM file (``write_ram``: zero pages stay holes). A memfd, not the file
    itself: page faults of a shared mapping of a file on disk made the save 18x slower
    (6 s paused for 600 MiB on ext4, against 0.33 s streaming it). It has no network, no share
    and no disk of its own (a network device's link goes nowhere; its disk is the
    checkpoint's copy, which it never reads), and lives as long as one checkpoint. Its
    serial port and network link stay connected until it is closed: a port or link that
    went down while it held the state would be saved as down, and the guest told so in
    every restore."""

    def __init__(self, rt: RuntimeDir, proc: subprocess.Popen, qmp: Qmp, source: socket.socket,
                 held: tuple[socket.socket, ...], memfd: int) -> None:  # fmt: skip
        self.rt, self.proc, self.qmp, self._source, self._held = rt, proc, qmp, source, held
        self._memfd, self._size = memfd, os.fstat(memfd).st_size  # (sealed: it stays)

    @property
    def source_fd(self) -> int:
        """The end the saved VM streams into (``migrate uri=fd:``)."""
        return self._source.fileno()

    @classmethod
    async def start(cls, backend: QemuBackend, vm: QemuVm, snapshot: Snapshot) -> Receiver:
        assert not vm.spec.shares, "a VM with shares cannot be saved (timeline refuses it)"
        image = GuestImage.load(vm.spec.image)
        rt = RuntimeDir.create()
        source, incoming = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        link, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mux = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # QEMU connects at start
        memfd = os.memfd_create("smol-checkpoint-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        proc = qmp = None
        try:
            os.ftruncate(memfd, vm.spec.memory_mib << 20)
            # Its size is the VM's for good: a QEMU that misbehaves cannot make us read or
            # write more than that.
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
            mux.bind(str(rt.path / "mux.sock"))
            mux.listen(1)
            with open(snapshot.overlay, "xb") as disk:  # filled while the VM is paused
                disk.truncate(vm.rt.overlay.stat().st_size)
            net = link.fileno() if vm.spec.network else None
            # (inherited as the same number: QEMU opens the very memfd)
            argv = backend._argv(vm.spec, image, vm.isolation, rt, snapshot.overlay, net,
                                 ram=Path(f"/proc/self/fd/{memfd}"), balloon=False,
                                 incoming=incoming.fileno(), frozen=True)  # fmt: skip
            fds = (incoming.fileno(), memfd, *(() if net is None else (net,)))
            proc = await asyncio.to_thread(spawn, argv, rt.path / "qemu.log", None, fds)
            rt.write_state({**owner_state(), "id": rt.id, "backend": "qemu",
                            "label": f"saving a checkpoint of VM {vm.id}",
                            "created": time.time(), "pids": {"vmm": proc.pid},
                            "starts": {"vmm": proc_start_time(proc.pid)}})  # fmt: skip
            qmp = await _qmp_once_started(proc, rt, RECEIVER_START_TIMEOUT)
            try:
                await qmp.execute("migrate-set-capabilities", capabilities=[
                    {"capability": "x-ignore-shared", "state": False}])  # fmt: skip
                await qmp.execute("migrate-incoming", uri=f"fd:{incoming.fileno()}")
            except QmpError as e:
                raise VmError(f"the QEMU that takes a checkpoint refused it: {e}") from None
        except BaseException:
            try:
                if qmp is not None:
                    await qmp.close()
            finally:
                for s in (source, peer, mux):
                    s.close()
                os.close(memfd)
                stop_processes((proc,))
                rt.remove()
            raise
        finally:
            incoming.close()  # QEMU has its own copies
            link.close()
        return cls(rt, proc, qmp, source, (peer, mux), memfd)

    async def save(self, snapshot: Snapshot, timeout: float) -> None:
        """Once all of the memory has arrived: the device state without the RAM, then the
        RAM file."""
        fd = os.open(snapshot.state, NEW_FILE, 0o600)
        try:
            await self.qmp.wait_migration(timeout)
            await self.qmp.execute("migrate-set-capabilities", capabilities=[
                {"capability": "x-ignore-shared", "state": True}])  # fmt: skip
            await self.qmp.send_fd("state", fd)
            await self.qmp.execute("migrate", uri="fd:state")
            await self.qmp.wait_migration(MIGRATION_TIMEOUT)
        except QmpError as e:
            raise VmError(f"writing a checkpoint's device state failed: {e}") from None
        finally:
            os.close(fd)
        # (its own descriptor: a cancelled save's thread may still read after close())
        await asyncio.to_thread(write_ram, os.dup(self._memfd), snapshot.ram, self._size)

    async def close(self) -> None:
        try:
            for s in (self._source, *self._held):
                s.close()
            os.close(self._memfd)
            await self.qmp.close()
        finally:
            stop_processes((self.proc,))
            self.rt.remove()


async def _qmp_once_started(proc: subprocess.Popen, rt: RuntimeDir, timeout: float) -> Qmp:
    """QMP of a QEMU that may take long to start (it allocates its RAM first), or exit at
    once: VmError then, with its own words."""
    deadline = time.monotonic() + timeout
    path = rt.path / "qmp.sock"
    try:
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise QmpError("it exited before its QMP socket was there")
            await asyncio.sleep(0.01)
        return await Qmp.connect(path, timeout=max(1.0, deadline - time.monotonic()))
    except (QmpError, OSError, TimeoutError, ValueError) as e:
        log = (rt.path / "qemu.log").read_text(errors="replace")[-1000:]
        raise VmError(f"the QEMU that takes a checkpoint did not start: {e}: {log}") from None


def write_ram(memfd: int, dest: Path, size: int, chunk: int = 1 << 20,
              page: int = 64 << 10) -> None:  # fmt: skip
    """Write ``size`` bytes of a guest's RAM from ``memfd`` (closed here) into the new file
    ``dest``, leaving holes where it has none or only zeros (a restore maps the file
    privately, and a hole reads as zeros)."""
    zeros = bytes(page)
    try:
        out = os.open(dest, NEW_FILE, 0o600)
    except OSError:
        os.close(memfd)
        raise
    try:
        os.ftruncate(out, size)
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(memfd, offset, os.SEEK_DATA)
            except OSError:  # nothing but holes after offset
                break
            data = os.pread(memfd, min(chunk, size - offset), offset)
            if not data:
                break
            for at in range(0, len(data), page):
                piece = data[at : at + page]  # bytes: compared with memcmp (a memoryview
                if piece != zeros[: len(piece)]:  # compares item by item, 20x slower)
                    os.pwrite(out, piece, offset + at)
            offset += len(data)
    finally:
        os.close(out)
        os.close(memfd)


def copy_sparse(src: Path, dest: Path) -> Path:
    """Copy a sparse disk image with its holes: only the data extents are read and written
    (a 2 GiB overlay with a few MiB in it copies in milliseconds)."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:  # no data after offset
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            offset = start
            while offset < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - offset, offset, offset)
                if n <= 0:
                    break
                offset += n
    return dest
