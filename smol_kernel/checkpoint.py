"""Checkpoints of live kernels on disk: where they are, what they hold, when they go.

A checkpoint is a folder ``<cache>/checkpoints/u<uid>/<kernel id>/<name>/``: ``state`` (all
of the VM's memory and device state, streamed by QEMU: variables, imported modules, processes),
``overlay.ext4`` (its writable disk as it was), ``vm.json`` (its devices) and
``checkpoint.json`` (what it is: the kernel, when, how big, how long the kernel was
paused, the configuration a VM restoring it must have, and whether it is kept).

Guarantees:
* A name is 1-64 of ``A-Z a-z 0-9 _ . -``, not starting with ``.`` or ``-``; whatever
  asked (a magic in the guest included) cannot name a path outside the kernel's folder.
* A checkpoint is written to a hidden folder and renamed into place: one that is listed
  is complete. Saving a name again replaces the old one.
* A kernel keeps at most its cap of checkpoints: the oldest that is not kept goes first.
* When its kernel is shut down, the kernel's checkpoints go too, but for kept ones
  (``keep``); ``prune`` removes those of kernels no process runs any more.

How a kernel is saved and restored is ``timeline.py``; this module only keeps the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .error_root import SmolKernelError
from .vm.qemu import Snapshot

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class CheckpointError(SmolKernelError):
    """A checkpoint could not be saved, found or used; the message says what to do."""


def checkpoints_dir() -> Path:
    """This user's checkpoints: ``$SMOL_KERNEL_CHECKPOINTS_DIR``, else
    ``<cache>/checkpoints/u<uid>`` (``paths.user_store``: private, checked on every use)."""
    return paths.user_store("checkpoints", "SMOL_KERNEL_CHECKPOINTS_DIR")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise CheckpointError(
            f"{str(name)[:80]!r} is not a checkpoint name: use 1-64 letters, digits, '_', "
            "'.' or '-', not starting with '.' or '-'"
        )
    return name


def kernel_folder(kernel_id: str) -> Path:
    if not KERNEL_ID.fullmatch(kernel_id or ""):
        raise CheckpointError(f"{str(kernel_id)[:80]!r} is not a kernel id")
    return checkpoints_dir() / kernel_id


@dataclass(frozen=True)
class Checkpoint:
    kernel_id: str
    name: str
    folder: Path
    created: float  # time.time()
    size_bytes: int  # on disk
    paused_s: float  # how long the kernel was paused to save it
    keep: bool  # stays when its kernel is shut down
    by_kernel: bool  # asked by the kernel itself (%checkpoint), not from the host
    plan_key: str  # the configuration a VM restoring it must have
    memory_mib: int
    description: str  # the configuration, for people

    @property
    def snapshot(self) -> Snapshot:
        return Snapshot(self.folder)

    def as_dict(self) -> dict:
        return {"kernel_id": self.kernel_id, "name": self.name, "created": self.created,
                "size_bytes": self.size_bytes, "paused_s": self.paused_s, "keep": self.keep,
                "memory_mib": self.memory_mib}  # fmt: skip

    def describe(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.created))
        kept = ", kept" if self.keep else ""
        return f"{self.name} ({when}, {self.size_bytes / (1 << 20):.0f} MiB{kept})"


def load(kernel_id: str, name: str) -> Checkpoint | None:
    folder = kernel_folder(kernel_id) / check_name(name)
    try:
        meta = json.loads((folder / "checkpoint.json").read_text())
        return Checkpoint(
            kernel_id=kernel_id, name=name, folder=folder, created=float(meta["created"]),
            size_bytes=int(meta["size_bytes"]), paused_s=float(meta["paused_s"]),
            keep=bool(meta.get("keep")), by_kernel=bool(meta.get("by_kernel")),
            plan_key=str(meta["plan_key"]),
            memory_mib=int(meta["memory_mib"]), description=str(meta.get("description", "")),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(kernel_id: str | None = None) -> list[Checkpoint]:
    """A kernel's checkpoints (every kernel's when None), oldest first."""
    base = checkpoints_dir()
    if kernel_id:
        kernels = [kernel_id]
    else:
        kernels = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    found = []
    for kid in kernels:
        if not KERNEL_ID.fullmatch(kid):
            continue
        folder = kernel_folder(kid)
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if NAME.fullmatch(entry.name) and (cp := load(kid, entry.name)) is not None:
                found.append(cp)
    return sorted(found, key=lambda c: c.created)


def staging(kernel_id: str, name: str) -> Path:
    """A fresh hidden folder to save ``name`` into (``commit`` moves it into place)."""
    folder = kernel_folder(kernel_id)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = folder / f".{check_name(name)}.{os.getpid()}.saving"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    return work


def commit(work: Path, kernel_id: str, name: str, *, paused_s: float, keep: bool,
           plan_key: str, memory_mib: int, description: str,
           by_kernel: bool = False) -> Checkpoint:  # fmt: skip
    size = sum(p.stat().st_blocks * 512 for p in work.iterdir() if p.is_file())
    meta = {"created": time.time(), "size_bytes": size, "paused_s": round(paused_s, 3),
            "keep": keep, "by_kernel": by_kernel, "plan_key": plan_key,
            "memory_mib": memory_mib, "description": description}  # fmt: skip
    (work / "checkpoint.json").write_text(json.dumps(meta))
    final = kernel_folder(kernel_id) / name
    if final.exists():  # saved again under the same name: the new one wins
        old = final.with_name(f".{name}.{os.getpid()}.replaced")
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(work, final)
    cp = load(kernel_id, name)
    if cp is None:
        raise CheckpointError(f"checkpoint {name!r} vanished right after it was saved")
    return cp


def remove(cp: Checkpoint) -> None:
    shutil.rmtree(cp.folder, ignore_errors=True)
    parent = cp.folder.parent
    try:
        parent.rmdir()  # the kernel's folder, once empty
    except OSError:
        pass


def enforce_cap(kernel_id: str, cap: int, by_kernel: bool = False) -> list[Checkpoint]:
    """Remove the oldest checkpoints of a kernel that are not kept, down to ``cap``
    (0: no cap); ``by_kernel``: only ones the kernel asked for (a guest cannot push out
    what the host saved). Returns the removed ones."""
    if cap <= 0:
        return []
    dropped = []
    checkpoints = list_checkpoints(kernel_id)
    while len(checkpoints) > cap:
        oldest = next((c for c in checkpoints
                       if not c.keep and (c.by_kernel or not by_kernel)), None)  # fmt: skip
        if oldest is None:
            break
        remove(oldest)
        checkpoints.remove(oldest)
        dropped.append(oldest)
    return dropped


def remove_kernel(kernel_id: str) -> list[Checkpoint]:
    """The kernel is gone: remove its checkpoints but the kept ones (and leftovers of
    saves it did not finish)."""
    removed = [c for c in list_checkpoints(kernel_id) if not c.keep]
    for cp in removed:
        remove(cp)
    folder = kernel_folder(kernel_id)
    for entry in folder.iterdir() if folder.is_dir() else []:
        if entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True)
    try:
        folder.rmdir()
    except OSError:
        pass
    return removed


def total_mib(kernel_id: str | None = None) -> int:
    return sum(c.size_bytes for c in list_checkpoints(kernel_id)) >> 20


def prune(running_kernels: set[str]) -> list[Checkpoint]:
    """Remove checkpoints (not kept) of kernels not in ``running_kernels``."""
    removed = []
    for cp in list_checkpoints():
        if cp.kernel_id not in running_kernels and not cp.keep:
            remove(cp)
            removed.append(cp)
    return removed
