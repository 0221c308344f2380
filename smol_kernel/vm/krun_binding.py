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

from ..error_root import SmolKernelError

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
# virtio-net features (libkrun.h's COMPAT_NET_FEATURES minus HOST_TSO4 and HOST_UFO): CSUM,
# GUEST_CSUM, GUEST_TSO4, GUEST_UFO. Without host segmentation offload the guest sends no
# frame over its MTU, so the network guard can drop every larger one (egress/netfilter.py).
COMPAT_NET_FEATURES = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 10)
DEFAULT_SONAME = "libkrun.1.dylib" if sys.platform == "darwin" else "libkrun.so.1"
LIBKRUNFW_SONAME = "libkrunfw.5.dylib" if sys.platform == "darwin" else "libkrunfw.so.5"
# Where a system's libkrun is installed. A bare name is never handed to dlopen: cffi would
# then ask ctypes.util.find_library, which runs gcc, ld and objdump from the server's PATH
# and working folder -- programs a guest with a rw share could have planted.
LIBRARY_DIRS = (
    "/usr/lib64", "/usr/lib", "/usr/local/lib64", "/usr/local/lib",
    "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
    "/opt/homebrew/lib", "/opt/local/lib",
)  # fmt: skip


def find_library(name: str) -> str | None:
    """``name`` as an absolute path in one of ``LIBRARY_DIRS``, or None."""
    for folder in LIBRARY_DIRS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


class KrunLoadError(SmolKernelError):
    """libkrun could not be loaded, or lacks what smol-kernel needs; the message says what."""


class KrunError(SmolKernelError, OSError):
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
        self._keep: list = []  # C buffers that must outlive the calls using them
        if path and not os.path.isabs(path):
            raise KrunLoadError(f"{path}: give libkrun's absolute path (SMOL_KERNEL_LIBKRUN)")
        found = path or find_library(DEFAULT_SONAME)
        if found is None:
            raise KrunLoadError(
                f"{DEFAULT_SONAME} is not installed in {', '.join(LIBRARY_DIRS)} "
                "(set SMOL_KERNEL_LIBKRUN to its absolute path if it is elsewhere)"
            )
        self.path = found
        # libkrun opens libkrunfw by soname: load it first, by path, so that is the one.
        libkrunfw = libkrunfw or find_library(LIBKRUNFW_SONAME)
        if libkrunfw and not os.path.isabs(libkrunfw):
            raise KrunLoadError(f"{libkrunfw}: give libkrunfw's absolute path")
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
