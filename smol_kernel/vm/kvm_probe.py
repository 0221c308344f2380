"""Does KVM really boot a guest here? Boot one and see.

Opening ``/dev/kvm`` is not enough: on paravirtualized KVM (PVM) hosts the device opens and
VMs are created, but an ordinary guest kernel never gets past its entry point. So the probe
boots the image's own kernel with ``smol.probe=1`` (our initramfs prints a marker and powers
off at once) and waits a few seconds for the marker. The answer is cached per host kernel,
QEMU binary and guest kernel, so the cost is paid once.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .. import paths
from ..trusted import helper_env

PROBE_MARKER = b"SMOL-PROBE-OK"
PROBE_TIMEOUT = 10.0


def _cache_file() -> Path:
    return paths.cache_dir() / "kvm-probe.json"


def _key(qemu: str, kernel: Path) -> str:
    st = os.stat(qemu)
    kst = kernel.stat()
    return f"{platform.release()}|{qemu}:{st.st_size}:{int(st.st_mtime)}|{kernel}:{kst.st_size}"


def kvm_device_problem() -> str | None:
    """Why /dev/kvm cannot be used at all, or None if it opens."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no hardware virtualization, or the kvm module is off)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open /dev/kvm ({e.strerror}); add your user to the 'kvm' group"
    os.close(fd)
    return None


def cached_probe(key: str, run: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    """``run()``'s (ok, reason), remembered under ``key`` in the cache dir."""
    cache: dict = {}
    try:
        cache = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        pass
    if key in cache:
        entry = cache[key]
        return bool(entry["ok"]), entry["reason"] + " (cached)"
    ok, reason = run()
    cache[key] = {"ok": ok, "reason": reason, "when": time.time()}
    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        tmp = _cache_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.rename(_cache_file())
    except OSError:
        pass
    return ok, reason


def probe_kvm(qemu: str, kernel: Path, initramfs: Path) -> tuple[bool, str]:
    """(usable, explanation). Boots a throwaway guest with -enable-kvm unless cached."""
    problem = kvm_device_problem()
    if problem:
        return False, problem
    return cached_probe(_key(qemu, kernel), lambda: _boot_probe(qemu, kernel, initramfs))


def _boot_probe(qemu: str, kernel: Path, initramfs: Path) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="smol-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            qemu, "-M", "microvm,x-option-roms=off,rtc=on", "-enable-kvm", "-cpu", "host",
            "-m", "256", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-display", "none", "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append", "console=ttyS0 quiet reboot=t panic=-1 smol.probe=1",
            "-serial", f"file:{console}",
        ]  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=tmp, env=helper_env(),
        )  # fmt: skip
        try:
            while time.monotonic() - t0 < PROBE_TIMEOUT:
                if console.exists() and PROBE_MARKER in console.read_bytes():
                    return True, f"a guest booted with KVM in {time.monotonic() - t0:.1f}s"
                if proc.poll() is not None:
                    out = (proc.stdout.read() if proc.stdout else b"").decode(errors="replace")
                    return False, f"QEMU with KVM exited ({proc.returncode}): {out.strip()[-300:]}"
                time.sleep(0.05)
            return False, (
                f"/dev/kvm opens but a guest kernel did not boot within {PROBE_TIMEOUT:.0f}s "
                "(e.g. paravirtualized KVM that cannot run ordinary guests)"
            )
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
