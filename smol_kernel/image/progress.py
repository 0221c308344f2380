"""Stage-by-stage progress: a live line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class StageProgress:
    def __init__(self, total: int, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.index = 0
        self.t0 = time.monotonic()
        self._stage_t0 = self.t0
        self._title = ""
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def stage(self, title: str) -> None:
        self._finish_stage()
        self.index += 1
        self._title = title
        self._stage_t0 = time.monotonic()
        if self.live:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        else:
            self._write(f"[{self.index}/{self.total}] {title} ...\n")

    def _tick(self) -> None:
        spin = "|/-\\"
        i = 0
        while not self._stop.wait(0.2):
            dt = time.monotonic() - self._stage_t0
            self._write(f"\r[{self.index}/{self.total}] {self._title} {spin[i % 4]} {dt:5.1f}s")
            i += 1

    def _finish_stage(self, failed: bool = False) -> None:
        if not self._title:
            return
        dt = time.monotonic() - self._stage_t0
        if self._ticker:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
        status = "FAILED" if failed else "done"
        prefix = "\r" if self.live else ""
        self._write(f"{prefix}[{self.index}/{self.total}] {self._title}: {status} in {dt:.1f}s\n")
        self._title = ""

    def done(self, message: str) -> None:
        self._finish_stage()
        self._write(f"{message} (total {time.monotonic() - self.t0:.1f}s)\n")

    def fail(self) -> None:
        self._finish_stage(failed=True)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
