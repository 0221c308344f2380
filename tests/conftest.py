"""Shared fixtures. Every VM here is real (QEMU microvm; TCG on machines without usable KVM).

The guest image must be built first (the README's test command does it). Tests that do not
need a fresh VM share one; tests where isolation is the point boot their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smol_kernel import paths
from smol_kernel.image.store import DEFAULT_IMAGE, GuestImage, ImageNotFound
from smol_kernel.vm.qemu import QemuBackend

BOOT_TIMEOUT = 90.0


@pytest.fixture(scope="session")
def image() -> GuestImage:
    try:
        return GuestImage.load(DEFAULT_IMAGE)
    except ImageNotFound as e:
        pytest.fail(f"{e}\n(the README's test command builds it before running pytest)")


@pytest.fixture(scope="session")
def qemu_backend(image) -> QemuBackend:
    backend = QemuBackend()
    status = backend.check(image.name)
    assert status.available, f"QEMU backend unusable here: {status.reason} ({status.fix})"
    return backend


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (e.g. a VM runtime dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            out.append(int(d.name))
    return out


def runtime_entries() -> set[str]:
    base = paths.runtime_dir()
    return {p.name for p in base.iterdir()} if base.exists() else set()
