"""libkrun through cffi in ABI mode: ``dlopen("libkrun.so.1")``, our own declarations.

Every negative return becomes ``KrunError`` naming the function and the errno. Optional
symbols are probed, so a library without a feature says which one is missing instead of
failing at the first call.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from importlib import resources

REQUIRED = (
    "krun_set_log_level", "krun_create_ctx", "krun_free_ctx", "krun_set_vm_config",
    "krun_set_root", "krun_set_workdir", "krun_set_exec", "krun_set_console_output",
    "krun_add_vsock_port2", "krun_start_enter",
)  # fmt: skip
# Added in libkrun 1.17; without them TSI networking cannot be turned off.
NO_NETWORK = ("krun_disable_implicit_vsock", "krun_add_vsock")
FEATURE_SYMBOLS = {
    "blk": "krun_add_disk2",
    "net": "krun_add_net_unixstream",
    "virtiofs": "krun_add_virtiofs",
    "virtiofs_ro": "krun_add_virtiofs3",
}
# What each feature is for, and what to install, when it is missing.
FEATURE_NEEDS = {
    "blk": "smol-kernel boots its guest image from a disk, so it needs libkrun built with BLK=1",
    "net": "network=True needs libkrun >= 1.15 built with NET=1",
    "virtiofs": "host folder shares need libkrun's virtio-fs",
    "virtiofs_ro": "read-only shares need libkrun >= 1.18 (krun_add_virtiofs3); use a newer "
    "libkrun, or share the folder :rw",
}
KRUN_DISK_FORMAT_RAW = 0
# virtio-net features passt expects (libkrun.h's COMPAT_NET_FEATURES): CSUM, GUEST_CSUM,
# GUEST_TSO4, GUEST_UFO, HOST_TSO4, HOST_UFO.
COMPAT_NET_FEATURES = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 10) | (1 << 11) | (1 << 14)
DEFAULT_SONAME = "libkrun.1.dylib" if sys.platform == "darwin" else "libkrun.so.1"
LIBKRUNFW_SONAME = "libkrunfw.5.dylib" if sys.platform == "darwin" else "libkrunfw.so.5"


class KrunLoadError(Exception):
    """libkrun could not be loaded, or lacks what smol-kernel needs; the message says what."""


class KrunError(OSError):
    """A krun_* call returned a negative errno."""

    def __init__(self, function: str, rc: int) -> None:
        self.function = function
        code = -rc
        name = errno.errorcode.get(code, f"errno {code}")
        super().__init__(code, f"{function} failed: {name} ({os.strerror(code)})")


def declarations() -> str:
    return resources.files("smol_kernel.native").joinpath("krun.h").read_text()


# A failed load is remembered briefly: backend selection runs on every kernel start, and a
# missing library costs a cdef parse and an ldconfig run each time (~40 ms).
LOAD_FAILURE_TTL = 30.0
_load_failures: dict[tuple, tuple[float, str]] = {}


class Krun:
    """A loaded libkrun. ``path`` overrides the soname; ``libkrunfw`` is preloaded by path
    (so libkrun's own dlopen of ``libkrunfw.so.5`` finds it)."""

    def __init__(self, path: str | None = None, libkrunfw: str | None = None) -> None:
        key = (path, libkrunfw)
        failed = _load_failures.get(key)
        if failed is not None and time.monotonic() - failed[0] < LOAD_FAILURE_TTL:
            raise KrunLoadError(failed[1])
        try:
            self._load(path, libkrunfw)
        except KrunLoadError as e:
            _load_failures[key] = (time.monotonic(), str(e))
            raise
        _load_failures.pop(key, None)

    def _load(self, path: str | None, libkrunfw: str | None) -> None:
        try:
            import cffi
        except ImportError as e:
            raise KrunLoadError(
                "the libkrun backend needs cffi: pip install 'smol-kernel[krun]'"
            ) from e
        self.ffi = cffi.FFI()
        self.ffi.cdef(declarations())
        self.path = path or DEFAULT_SONAME
        self._keep: list = []  # C buffers that must outlive the calls using them
        if libkrunfw:
            try:
                self.ffi.dlopen(libkrunfw, self.ffi.RTLD_NOW | self.ffi.RTLD_GLOBAL)
            except OSError as e:
                raise KrunLoadError(f"cannot load libkrunfw from {libkrunfw}: {e}") from e
        try:
            self.lib = self.ffi.dlopen(self.path, self.ffi.RTLD_NOW)
        except OSError as e:
            raise KrunLoadError(f"cannot load {self.path}: {e}") from e
        missing = [s for s in REQUIRED if not self.has(s)]
        if missing:
            raise KrunLoadError(
                f"{self.path} is not a usable libkrun v1 library: missing {', '.join(missing)}"
            )
        too_old = [s for s in NO_NETWORK if not self.has(s)]
        if too_old:
            raise KrunLoadError(
                f"{self.path} is too old: it lacks {', '.join(too_old)} (libkrun >= 1.17), "
                "without which the guest cannot be kept off the network. Upgrade libkrun."
            )

    def has(self, symbol: str) -> bool:
        try:
            getattr(self.lib, symbol)
        except (AttributeError, NotImplementedError):
            return False
        return True

    def features(self) -> dict[str, bool]:
        return {name: self.has(sym) for name, sym in FEATURE_SYMBOLS.items()}

    def require(self, feature: str) -> None:
        if not self.has(FEATURE_SYMBOLS[feature]):
            raise KrunLoadError(
                f"{self.path} lacks the '{feature}' feature ({FEATURE_SYMBOLS[feature]} is "
                f"missing): {FEATURE_NEEDS[feature]}"
            )

    # ---------------------------------------------------------------- calls
    def call(self, name: str, *args) -> int:
        rc = getattr(self.lib, name)(*args)
        if rc < 0:
            raise KrunError(name, rc)
        return rc

    def cstr(self, s: str):
        buf = self.ffi.new("char[]", s.encode())
        self._keep.append(buf)
        return buf

    def mac(self, text: str):
        """A ``uint8_t[6]`` from ``aa:bb:cc:dd:ee:ff``."""
        buf = self.ffi.new("uint8_t[6]", bytes.fromhex(text.replace(":", "")))
        self._keep.append(buf)
        return buf

    def cstr_array(self, items: list[str]):
        """A NULL-terminated ``const char *const[]``."""
        bufs = [self.cstr(s) for s in items]
        arr = self.ffi.new("const char *[]", [*bufs, self.ffi.NULL])
        self._keep.append(arr)
        return arr
