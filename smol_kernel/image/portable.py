"""One portable file per guest image: build once, copy to every machine, import.

The file is a plain (optionally gzip-compressed) tar holding exactly ``manifest.json`` first
and then ``IMAGE_FILES``, regular files only. Import trusts nothing in it: member names
must be exactly those, each file is streamed into a private temporary folder next to the
image store while its size and sha256 are checked against the manifest, and only a
complete, verified image is renamed into place. A corrupt, truncated or tampered file is
refused with the reason and leaves nothing behind. ``export`` returns the whole file's
sha256; pass it to ``import_image(expected_sha256=...)`` to also catch a file whose
manifest was rewritten to match altered contents.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

from .. import paths
from ..error_root import SmolKernelError
from .store import (
    IMAGE_FILES,
    GuestImage,
    ImageNotFound,
    check_name,
    file_sha256,
    max_image_bytes,
)

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
CHUNK = 1 << 20


class ImageFileError(SmolKernelError, ValueError):
    """The portable image file cannot be imported; the message says why."""


def export_image(name: str, dest: Path, compress: bool = False) -> str:
    """Write image ``name`` to ``dest`` (atomically); returns the file's sha256."""
    image = GuestImage.load(name)
    files = image.manifest.get("files") or {}
    if set(files) != set(IMAGE_FILES):
        raise ImageFileError(f"image {name!r} has no file checksums in its manifest; rebuild it")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as raw:
            gz = (
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0)
                if compress
                else None
            )
            with tarfile.open(fileobj=gz or raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for member in (MANIFEST, *IMAGE_FILES):
                    info = tar.gettarinfo(str(image.path / member), arcname=member)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mode = 0o644
                    with open(image.path / member, "rb") as f:
                        tar.addfile(info, f)
            if gz is not None:
                gz.close()
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_sha256(dest)


def import_image(
    src: Path, name: str | None = None, force: bool = False, expected_sha256: str | None = None
) -> GuestImage:
    """Verify and install the image in ``src``; its own name unless ``name`` is given."""
    src = Path(src)
    if not src.is_file():
        raise ImageFileError(f"{src} is not a file")
    if expected_sha256 and file_sha256(src) != expected_sha256.lower():
        raise ImageFileError(f"{src} does not have the sha256 you gave: it is not that file")
    store = paths.images_dir()
    store.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".import-", dir=store))
    try:
        manifest = _unpack(src, work)
        target = check_name(name or str(manifest.get("name", "")))
        manifest["name"] = target
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        final = store / target
        if final.exists():
            if not force:
                raise ImageFileError(
                    f"an image named {target!r} exists; pass --name NEW or --force to replace it"
                )
            shutil.rmtree(final)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        return GuestImage.load(target)
    except ImageNotFound as e:  # pragma: no cover - we just verified it
        raise ImageFileError(str(e)) from None


def _unpack(src: Path, work: Path) -> dict:
    """Stream the members into ``work``, checking names, types, sizes and sha256."""
    try:
        tar = tarfile.open(src, mode="r:*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ImageFileError(f"{src} is not a smol-kernel image file ({e})") from None
    manifest: dict | None = None
    seen: list[str] = []
    try:
        with tar:
            for member in tar:
                where = f"{src}: member {member.name!r}"
                if not member.isfile():
                    raise ImageFileError(f"{where} is not a regular file")
                expected = [MANIFEST] if manifest is None else [f for f in IMAGE_FILES
                                                                  if f not in seen]  # fmt: skip
                if member.name not in expected:
                    raise ImageFileError(f"{where} is unexpected (expected {', '.join(expected)})")
                f = tar.extractfile(member)
                assert f is not None
                if manifest is None:
                    if member.size > MAX_MANIFEST_BYTES:
                        raise ImageFileError(f"{where} is too large for a manifest")
                    manifest = _read_manifest(f.read(), src)
                    _check_room(manifest, src, work)
                    seen.append(MANIFEST)
                    continue
                want = manifest["files"][member.name]
                if member.size != want["size"]:
                    raise ImageFileError(f"{where} has {member.size} bytes, the manifest says "
                                         f"{want['size']}: the file was altered")  # fmt: skip
                _copy_checked(f, work / member.name, int(want["size"]), str(want["sha256"]),
                              where)  # fmt: skip
                seen.append(member.name)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError, zlib.error) as e:
        raise ImageFileError(f"{src} is truncated or corrupt ({e})") from None
    missing = [f for f in (MANIFEST, *IMAGE_FILES) if f not in seen]
    if missing:
        raise ImageFileError(f"{src} is truncated or incomplete: no {', '.join(missing)}")
    assert manifest is not None
    return manifest


def _check_room(manifest: dict, src: Path, work: Path) -> None:
    """Before a byte of the image is written: its files fit the size cap and the disk."""
    total = sum(int(f["size"]) for f in manifest["files"].values())
    cap = max_image_bytes()
    if total > cap or any(int(f["size"]) < 0 for f in manifest["files"].values()):
        raise ImageFileError(
            f"{src} unpacks to {total / (1 << 30):.1f} GiB, over the "
            f"{cap / (1 << 30):.0f} GiB cap (SMOL_KERNEL_MAX_IMAGE_GIB)"
        )
    free = shutil.disk_usage(work).free
    if total > free:
        raise ImageFileError(f"{src} needs {total >> 20} MiB and {work} has {free >> 20} MiB "
                             "free: make room first")  # fmt: skip


def _read_manifest(data: bytes, src: Path) -> dict:
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        ok = isinstance(manifest, dict) and set(files) == set(IMAGE_FILES) and all(
            isinstance(files[f].get("size"), int) and isinstance(files[f].get("sha256"), str)
            for f in IMAGE_FILES
        )  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ImageFileError(f"{src} has no valid image manifest")
    return manifest


def _copy_checked(f: BinaryIO, dest: Path, size: int, sha256: str, where: str) -> None:
    h = hashlib.sha256()
    copied = 0
    with open(dest, "wb") as out:
        while chunk := f.read(CHUNK):
            copied += len(chunk)
            h.update(chunk)
            out.write(chunk)
    if copied != size:
        raise ImageFileError(f"{where} is truncated ({copied} of {size} bytes)")
    if h.hexdigest() != sha256:
        raise ImageFileError(f"{where} does not match its sha256: the file is corrupt or altered")
