"""Built guest images on disk: ``<cache>/images/<name>/`` with a JSON manifest.

An image directory holds:

* ``root.ext4``      -- the read-only root filesystem (Debian + python3 + ipykernel + agent)
* ``vmlinux``        -- the guest kernel, uncompressed ELF (PVH boot: no decompression in TCG)
* ``initramfs.cpio`` -- busybox, /init and only the kernel modules the guest needs
* ``manifest.json``  -- inputs, versions, file sizes and sha256, build time
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..error_root import SmolKernelError

DEFAULT_IMAGE = "default"
MAX_MANIFEST_BYTES = 1 << 20
MAX_INITRAMFS_BYTES = 256 << 20
IMAGE_FILES = ("root.ext4", "vmlinux", "initramfs.cpio")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ImageNotFound(SmolKernelError):
    """The named guest image has not been built."""


def max_image_bytes() -> int:
    """Most bytes an image file, an OCI image's layers or an import may unpack to:
    ``SMOL_KERNEL_MAX_IMAGE_GIB`` (default 32). Checked while reading, so a gzip bomb or a
    sparse member stops at the cap instead of filling the disk."""
    import os

    try:
        gib = float(os.environ.get("SMOL_KERNEL_MAX_IMAGE_GIB", "32"))
    except ValueError:
        gib = 32.0
    return int(gib * (1 << 30))


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"invalid image name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 64, not starting with a punctuation mark)"
        )
    return name


@dataclass(frozen=True)
class GuestImage:
    """A built guest image."""

    name: str
    path: Path
    manifest: dict

    @property
    def root_disk(self) -> Path:
        return self.path / "root.ext4"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinux"

    @property
    def initramfs(self) -> Path:
        return self.path / "initramfs.cpio"

    @property
    def kernel_release(self) -> str:
        versions = self.manifest.get("versions")
        release = versions.get("kernel_release") if isinstance(versions, dict) else None
        return str(release) if release is not None else "?"

    @property
    def build_id(self) -> str:
        """Which build of the image this is (a rebuild in place gets another)."""
        return f"{self.manifest.get('input_hash')}@{self.manifest.get('created')}"

    @property
    def inputs(self) -> dict:
        """What the image was built from ({} for a manifest without them)."""
        inputs = self.manifest.get("inputs")
        return inputs if isinstance(inputs, dict) else {}

    @classmethod
    def load(cls, name: str, root: Path | None = None) -> GuestImage:
        """Find a built image by name, or raise ImageNotFound with the command that builds it."""
        check_name(name)
        base = (root or paths.images_dir()) / name
        manifest_file = base / "manifest.json"
        build_cmd = "smol-kernel image build" + ("" if name == DEFAULT_IMAGE else f" --name {name}")
        if not manifest_file.exists():
            raise ImageNotFound(
                f"guest image {name!r} is not built (looked in {base}). Build it with: {build_cmd}"
            )
        try:
            with open(manifest_file, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
            if len(data) > MAX_MANIFEST_BYTES:
                raise ValueError(f"over {MAX_MANIFEST_BYTES} bytes")
            manifest = json.loads(data)
        except (OSError, ValueError, RecursionError) as e:
            raise ImageNotFound(f"guest image {name!r} has an unreadable manifest ({e}). "
                                f"Rebuild it with: {build_cmd} --force") from None  # fmt: skip
        if not isinstance(manifest, dict):
            raise ImageNotFound(f"guest image {name!r} has no valid manifest. "
                                f"Rebuild it with: {build_cmd} --force")  # fmt: skip
        missing = [f for f in IMAGE_FILES if not (base / f).exists()]
        if missing:
            raise ImageNotFound(
                f"guest image {name!r} is incomplete (missing {', '.join(missing)}). "
                f"Rebuild it with: {build_cmd} --force"
            )
        return cls(name=name, path=base, manifest=manifest)


def list_images(root: Path | None = None) -> list[GuestImage]:
    base = root or paths.images_dir()
    out = []
    if base.is_dir():
        for d in sorted(base.iterdir()):
            if (d / "manifest.json").exists():
                try:
                    out.append(GuestImage.load(d.name, base))
                except (ImageNotFound, ValueError, json.JSONDecodeError):
                    continue
    return out


def remove_image(name: str, root: Path | None = None) -> Path:
    check_name(name)
    base = (root or paths.images_dir()) / name
    if not base.is_dir():
        raise ImageNotFound(f"no guest image named {name!r} in {base.parent}")
    shutil.rmtree(base)
    return base


def file_sha256(path: Path) -> str:
    """The sha256 of a file (an image's files are listed by it in their manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
