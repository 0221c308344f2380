"""What every image build does, whatever its root's source: the state stages hand on
(``Build``), running a build tool with a readable error, pip for the guest, and the boot
files (kernel, direct-boot vmlinux, initramfs with our init).

A stage is ``(title, step)``: ``step(build)`` does the work, the title is what the
progress line shows (it may name what an earlier stage found: ``{wanted}``).
"""

from __future__ import annotations

import bz2
import compileall
import gzip
import hashlib
import io
import lzma
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..error_root import SmolKernelError
from ..guest import agent as _agent_mod
from ..guest import protocol as P
from .debian import Apt, unpack_deb
from .initramfs import GUEST_MODULES, OPTIONAL_MODULES, build_initramfs, resolve_modules
from .oci_root import GuestPython
from .store import file_sha256

# Host package files copied into the guest's GUEST_AGENT_DIR (their hashes are inputs).
GUEST_FILES = tuple(
    Path(_agent_mod.__file__).with_name(name)
    for name in ("agent.py", "pid1.py", "kernel_process.py", "protocol.py", "mux.py",
                 "kernel_launcher.py", "sandbox_ops.py")
)  # fmt: skip
SUITE_PYTHON = {"bookworm": "3.11", "trixie": "3.13"}
MIN_FREE_BYTES = 2 << 30
PIP_PLATFORMS = (
    "manylinux_2_36_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64",
    "manylinux1_x86_64", "linux_x86_64",
)  # fmt: skip


class ImageBuildError(SmolKernelError):
    """The image could not be built; the message says why and what to do."""


@dataclass
class Build:
    """What one build's stages hand on to the next."""

    work: Path  # a temporary folder next to the images
    out: Path  # the image folder being made
    versions: dict[str, str] = field(default_factory=dict)
    wanted: list[str] = field(default_factory=list)  # pip packages (and -r FILE) for the guest
    staging: Path | None = None  # pip's install target, copied into the root
    release: str = ""  # the guest kernel's release
    python: GuestPython | None = None  # an OCI image's python3

    @property
    def kernel_dir(self) -> Path:
        return self.work / "kernel"

    @property
    def busybox_dir(self) -> Path:
        return self.work / "busybox"


Stage = tuple[str, Callable[[Build], None]]


def guest_file_hashes() -> dict[str, str]:
    """The hashes of what we put into every guest: an image's inputs."""
    hashes = {f.name: file_sha256(f) for f in GUEST_FILES}
    hashes["init.sh"] = hashlib.sha256(init_script()).hexdigest()
    return hashes


def init_script() -> bytes:
    """The initramfs's /init, naming the agent folder from ``protocol.py``."""
    script = resources.files("smol_kernel.image").joinpath("init.sh").read_bytes()
    return script.replace(b"@GUEST_AGENT_DIR@", P.GUEST_AGENT_DIR.encode())


def disk_full_message(images_root: Path) -> str:
    free = shutil.disk_usage(images_root).free if images_root.exists() else 0
    return (
        f"disk full: {free >> 20} MiB free under {images_root}, a guest image needs "
        f"about {MIN_FREE_BYTES >> 20} MiB while building. Free some space or set "
        "SMOL_KERNEL_CACHE_DIR to a larger disk."
    )


def run_tool(b: Build, cmd: list[str], what: str) -> subprocess.CompletedProcess:
    """Run a build tool; ImageBuildError with the lines that say what went wrong."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        if "No space left on device" in text:
            raise ImageBuildError(disk_full_message(b.work.parent))
        lines = text.strip().splitlines()
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR:"))]
        # apt's own "E:" lines say what is wrong (e.g. an unknown package); the lines
        # just before mmdebstrap's first "E:" show a failing hook's own message.
        first = next((i for i, ln in enumerate(lines) if ln.startswith("E:")), len(lines))
        context = [ln for ln in lines[max(0, first - 5) : first] if not ln.startswith("I:")]
        detail = "\n".join(context + errors) if errors else "\n".join(lines[-30:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n{detail}")
    return proc


def pip_install(b: Build, staging: Path, pyver: str, requirements: list[str]) -> None:
    """Wheels of ``requirements`` (pip arguments) for CPython ``pyver`` into ``staging``,
    resolved on the host (its pip configuration applies)."""
    cmd = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
        "--target", str(staging), "--only-binary=:all:", "--implementation", "cp",
        "--python-version", pyver,
    ]  # fmt: skip
    for plat in PIP_PLATFORMS:
        cmd += ["--platform", plat]
    try:
        run_tool(b, [*cmd, *requirements], "pip install (for the guest)")
    except ImageBuildError as e:
        raise ImageBuildError(
            f"{e}\n(guest pip packages must be available as wheels for CPython {pyver} "
            "on x86_64 Linux)"
        ) from None
    shutil.rmtree(staging / "bin", ignore_errors=True)


def compile_folder(folder: Path, guest_path: str) -> None:
    """Byte-compile ``folder`` as if it were at ``guest_path`` in the guest."""
    if not compileall.compile_dir(folder, quiet=2, ddir=guest_path, workers=0):
        raise ImageBuildError(f"compiling the Python files for {guest_path} failed")


# ---------------------------------------------------------------- the boot files
def boot_stages(kernel_package: str) -> list[Stage]:
    """Kernel and busybox (first, as each source places it), vmlinux, initramfs."""

    def download(b: Build) -> None:
        apt = Apt()
        kernel_pkg = apt.resolve(kernel_package)
        unpack_deb(apt.download(kernel_pkg, b.work / "debs"), b.kernel_dir)
        unpack_deb(apt.download("busybox-static", b.work / "debs"), b.busybox_dir)
        releases = sorted((b.kernel_dir / "lib" / "modules").iterdir())
        if not releases:
            raise ImageBuildError(f"{kernel_pkg} contains no kernel modules")
        b.release = releases[-1].name
        b.versions["kernel_package"] = kernel_pkg
        b.versions["kernel_release"] = b.release

    return [
        (f"download kernel ({kernel_package}) and busybox", download),
        ("kernel for direct boot (vmlinux)", _vmlinux),
        ("initramfs", _initramfs),
    ]


def _vmlinux(b: Build) -> None:
    bzimage = next((b.kernel_dir / "boot").glob("vmlinuz-*"))
    extract_vmlinux(bzimage, b.out / "vmlinux")


def _initramfs(b: Build) -> None:
    mdir = b.kernel_dir / "lib" / "modules" / b.release
    modules = resolve_modules(mdir, GUEST_MODULES)
    optional = {  # each group's modules and deps, minus those always loaded
        group: [ko for ko in resolve_modules(mdir, names) if ko not in modules]
        for group, names in OPTIONAL_MODULES.items()
    }
    build_initramfs(b.busybox_dir / "bin" / "busybox", init_script(), modules,
                    b.out / "initramfs.cpio", optional)  # fmt: skip


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Decompress the ELF kernel inside a bzImage, for direct (PVH) boot."""
    data = bzimage.read_bytes()
    for magic, decompress in (
        (b"\xfd7zXZ\x00", lambda d: lzma.LZMADecompressor().decompress(d)),
        (b"\x1f\x8b\x08", lambda d: gzip.GzipFile(fileobj=io.BytesIO(d)).read()),
        (b"BZh", lambda d: bz2.BZ2Decompressor().decompress(d)),
    ):
        start = data.find(magic)
        while start != -1:
            try:
                elf = decompress(data[start:])
            except (lzma.LZMAError, OSError, EOFError, ValueError):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                out.write_bytes(elf)
                return
            start = data.find(magic, start + 1)
    raise ImageBuildError(
        f"cannot find an xz/gzip/bzip2-compressed ELF kernel in {bzimage.name}; "
        "use a Debian linux-image package for amd64"
    )
