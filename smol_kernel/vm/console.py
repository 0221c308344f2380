"""A size cap for guest console logs.

The console is the one guest output that bypasses the relay: root in the guest can write
``/dev/console`` without end, and the VMM appends it to ``<runtime>/console.log``. One
watcher thread checks every live VM's log twice a second; a log whose disk usage passes
the cap (``SMOL_KERNEL_CONSOLE_LOG_KIB``, default 4096 KiB) is cut back to a marker line
plus its last 64 KiB, so error messages still show the latest console lines. QEMU opens
the log with O_APPEND, so its next write lands after the cut; a writer without O_APPEND
(libkrun) leaves a sparse hole, which takes no disk space.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

KEEP_BYTES = 64 << 10
INTERVAL = 0.5
_watched: set[Path] = set()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def console_cap_bytes() -> int:
    return int(os.environ.get("SMOL_KERNEL_CONSOLE_LOG_KIB", "4096")) << 10


def cap_log(path: Path, cap: int, keep: int = KEEP_BYTES) -> int:
    """Cut ``path`` back if it uses more than ``cap`` bytes; returns the bytes dropped."""
    try:
        with open(os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), "r+b") as f:
            st = os.fstat(f.fileno())
            if min(st.st_size, st.st_blocks * 512) <= cap:
                return 0
            f.seek(max(0, st.st_size - keep))
            tail = f.read(keep)
            f.truncate(0)
            f.seek(0)
            dropped = st.st_size - len(tail)
            f.write(f"\n[smol-kernel: {dropped} bytes of console output dropped]\n".encode())
            f.write(tail)
            return dropped
    except OSError:
        return 0


def watch(path: Path) -> None:
    global _thread
    with _lock:
        _watched.add(path)
        if _thread is None:
            _thread = threading.Thread(target=_run, name="smol-console-cap", daemon=True)
            _thread.start()


def unwatch(path: Path) -> None:
    with _lock:
        _watched.discard(path)


def _run() -> None:
    event = threading.Event()
    while not event.wait(INTERVAL):
        with _lock:
            paths = list(_watched)
        cap = console_cap_bytes()
        for path in paths:
            cap_log(path, cap)
