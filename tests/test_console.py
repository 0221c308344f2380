"""The console log cap (the end-to-end flood is in tests/security/test_hostile.py)."""

from __future__ import annotations

import os

from smol_kernel.vm.console import cap_log


def test_a_log_over_the_cap_is_cut_back_to_a_marker_and_its_tail(tmp_path):
    log = tmp_path / "console.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # as QEMU opens it
    try:
        os.write(fd, b"boot\n" + b"x" * 300_000 + b"\nlast line\n")
        assert cap_log(log, cap=1 << 20, keep=1000) == 0, "under the cap: untouched"
        dropped = cap_log(log, cap=100_000, keep=1000)
        text = log.read_bytes()
        assert dropped == 300_016 - 1000
        marker = f"\n[smol-kernel: {dropped} bytes of console output dropped]\n"
        assert text.startswith(marker.encode())
        assert text.endswith(b"x" * 989 + b"\nlast line\n")
        os.write(fd, b"after the cut\n")  # the writer appends after the cut, no hole
        assert log.read_bytes() == text + b"after the cut\n"
    finally:
        os.close(fd)


def test_a_sparse_log_is_judged_by_disk_usage(tmp_path):
    log = tmp_path / "console.log"
    with open(log, "wb") as f:  # a writer without O_APPEND after a cut: a big hole
        f.seek(50 << 20)
        f.write(b"tail\n")
    assert cap_log(log, cap=1 << 20) == 0
    assert log.stat().st_size > 50 << 20
