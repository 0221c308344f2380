"""Built guest images on disk: ``<cache>/images/<name>/`` with a JSON manifest.

An image directory holds:

* ``root.ext4``      -- the read-only root filesystem (Debian + python3 + ipykernel + agent)
* ``vmlinux``        -- the guest kernel, uncompressed ELF (PVH boot: no decompression in TCG)
* ``initramfs.cpio`` -- busybox, /init and only the kernel modules the guest needs
* ``manifest.json``  -- inputs, versions, file sizes and sha256, build time
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import paths

DEFAULT_IMAGE = "default"
IMAGE_FILES = ("root.ext4", "vmlinux", "initramfs.cpio")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ImageNotFound(Exception):
    """The named guest image has not been built."""


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
        return self.manifest.get("versions", {}).get("kernel_release", "?")

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
        manifest = json.loads(manifest_file.read_text())
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
