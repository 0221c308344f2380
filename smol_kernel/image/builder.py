"""Build a guest image: Debian root (mmdebstrap) + kernel + tiny initramfs + our agent.
With ``from_oci`` the root comes from a container image on disk instead (``oci.py``).

The build happens in a temporary directory next to the destination and is renamed into
place only when complete, so a failed or interrupted build never leaves a half image (and
never leaks its temp dir). An image is rebuilt only when its inputs change.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .. import __version__, paths
from .build_steps import (
    MIN_FREE_BYTES,
    SUITE_PYTHON,
    Build,
    ImageBuildError,
    Stage,
    boot_stages,
    disk_full_message,
    extract_vmlinux,
    guest_file_hashes,
)
from .debian import require_tool
from .debian_root import DebianRoot
from .initramfs import GUEST_MODULES, OPTIONAL_MODULES
from .oci_source import OciSource
from .progress import StageProgress
from .store import DEFAULT_IMAGE, GuestImage, check_name, file_sha256

BUILDER_VERSION = 1
__all__ = ["PRESETS", "ImageBuildError", "ImageBuilder", "extract_vmlinux"]


# What a data notebook expects, from Debian (tested together, no compiler needed).
PRESETS = {
    "scipy": ("python3-numpy", "python3-pandas", "python3-matplotlib", "python3-scipy",
              "python3-sympy", "python3-openpyxl"),
}  # fmt: skip


class ImageBuilder:
    """Builds one named guest image.

    ``apt`` and ``pip`` are extra packages for the guest, ``requirements`` a pip
    requirements file; ``preset`` adds a named set of Debian packages (``PRESETS``). pip
    packages are resolved on the host (so the host's pip configuration applies; the network
    is used at build time only) as wheels for the guest's Python and copied into
    ``/usr/local/lib/python3.X/dist-packages``.

    ``from_oci``: the root is that container image's (``oci.py``), with our agent added and
    ipykernel too if it has none; ``apt``, ``preset`` and ``suite`` do not apply. Its files
    get their owners really when ``fakeroot`` is false (needs root), else in fakeroot's
    records, which mke2fs reads (default: fakeroot unless running as root).
    """

    def __init__(
        self,
        name: str = DEFAULT_IMAGE,
        apt: list[str] | tuple[str, ...] = (),
        pip: list[str] | tuple[str, ...] = (),
        suite: str = "bookworm",
        kernel_package: str = "linux-image-amd64",
        images_root: Path | None = None,
        mmdebstrap: str = "mmdebstrap",
        progress: StageProgress | None = None,
        requirements: Path | None = None,
        preset: str | None = None,
        from_oci: Path | None = None,
        fakeroot: bool | None = None,
    ) -> None:
        self.name = check_name(name)
        self.from_oci = Path(from_oci).absolute() if from_oci else None
        # how --from-oci gives files their owners: really (root), or in fakeroot's records
        self.fakeroot = os.geteuid() != 0 if fakeroot is None else fakeroot
        if self.from_oci is not None and (apt or preset or suite != "bookworm"):
            raise ValueError(
                "--apt, --preset and --suite build a Debian root; with --from-oci the root "
                "is the container image's: install packages in the image, or add pip "
                "packages with --pip or --requirements"
            )
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        self.preset = preset
        self.apt = sorted(set(apt) | set(PRESETS.get(preset or "", ())))
        self.pip = sorted(set(pip))
        self.requirements = Path(requirements) if requirements else None
        self._requirements_text = ""
        if self.requirements is not None:
            try:
                self._requirements_text = self.requirements.read_text()
            except OSError as e:
                raise ValueError(f"cannot read the requirements file: {e}") from None
        if suite not in SUITE_PYTHON:
            raise ValueError(f"unsupported suite {suite!r}; choose from {sorted(SUITE_PYTHON)}")
        self.suite = suite
        self.kernel_package = kernel_package
        self.images_root = images_root or paths.images_dir()
        self.progress = progress
        for pkg in self.apt:
            if not pkg or pkg.startswith("-") or any(c.isspace() for c in pkg):
                raise ValueError(f"invalid apt package name {pkg!r}")
        for pkg in self.pip:
            if not pkg or pkg.startswith("-"):
                raise ValueError(f"invalid pip requirement {pkg!r}")
        pip_args = self.pip + (["-r", str(self.requirements)] if self.requirements else [])
        # One source of the root, each with its own stages (debian_root.py, oci_source.py)
        self.source: DebianRoot | OciSource = (
            OciSource(self.from_oci, pip_args, self.fakeroot)  # OciError: what is wrong
            if self.from_oci is not None
            else DebianRoot(suite, self.apt, pip_args, mmdebstrap)
        )

    # ---------------------------------------------------------------- inputs
    def inputs(self) -> dict:
        return {
            "builder_version": BUILDER_VERSION,
            **self.source.inputs(),
            "pip": self.pip,
            "requirements": self._requirements_text,
            "kernel_package": self.kernel_package,
            "modules": list(GUEST_MODULES),
            "optional_modules": OPTIONAL_MODULES,
            "guest_files": guest_file_hashes(),
        }

    def input_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.inputs(), sort_keys=True).encode()).hexdigest()

    @property
    def dest(self) -> Path:
        return self.images_root / self.name

    def current(self) -> GuestImage | None:
        """The existing image if it was built from the same inputs."""
        try:
            image = GuestImage.load(self.name, self.images_root)
        except Exception:
            return None
        return image if image.manifest.get("input_hash") == self.input_hash() else None

    # ---------------------------------------------------------------- build
    def build(self, force: bool = False) -> GuestImage:
        if not force and (image := self.current()):
            if self.progress:
                self.progress.done(f"image {self.name!r} is up to date at {image.path}")
            return image
        self._preflight()
        self.images_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".build-{self.name}-", dir=self.images_root))
        t0 = time.monotonic()
        try:
            image = self._build_in(work, t0)
        except OSError as e:
            if self.progress:
                self.progress.fail()
            if e.errno == errno.ENOSPC:
                raise ImageBuildError(self._disk_full_message()) from e
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ImageBuildError(
                    f"no permission to write the image ({e}). Make {self.images_root} "
                    "writable or set SMOL_KERNEL_CACHE_DIR to a writable directory."
                ) from e
            raise
        except BaseException:
            if self.progress:
                self.progress.fail()
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return image

    def _disk_full_message(self) -> str:
        return disk_full_message(self.images_root)

    def stage_count(self) -> int:
        return len(self.pipeline())

    def pipeline(self) -> list[Stage]:
        """The stages of this build, in order: the root's source declares its own and
        places the boot files' among them."""
        return self.source.stages(boot_stages(self.kernel_package))

    def _preflight(self) -> None:
        self.source.preflight()
        require_tool("mke2fs", "e2fsprogs")
        require_tool("dpkg-deb", "dpkg")
        # Find the nearest existing ancestor to check permissions and free space.
        probe = self.images_root
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise ImageBuildError(
                f"no permission to write under {probe}. Make it writable or set "
                "SMOL_KERNEL_CACHE_DIR to a writable directory."
            )
        if shutil.disk_usage(probe).free < MIN_FREE_BYTES:
            raise ImageBuildError(self._disk_full_message())

    def _stage(self, title: str) -> None:
        if self.progress:
            self.progress.stage(title)

    def _build_in(self, work: Path, t0: float) -> GuestImage:
        b = Build(work, work / "image")
        b.out.mkdir()
        b.wanted = self.pip + ([f"-r {self.requirements}"] if self.requirements else [])
        for title, step in self.pipeline():
            self._stage(title.format(wanted=", ".join(b.wanted) or "none"))
            step(b)
        out, versions = b.out, b.versions

        manifest = {
            "name": self.name,
            "smol_kernel_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0, 1),
            "inputs": self.inputs(),
            "input_hash": self.input_hash(),
            "versions": versions,
            "files": {
                f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
                for f in sorted(out.iterdir())
            },
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        # Swap into place: the old image (if any) stays usable until the rename.
        old = None
        if self.dest.exists():
            old = self.dest.with_name(f".old-{self.name}-{os.getpid()}")
            self.dest.rename(old)
        out.rename(self.dest)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        image = GuestImage.load(self.name, self.images_root)
        if self.progress:
            self.progress.done(f"built image {self.name!r} at {image.path}")
        return image
