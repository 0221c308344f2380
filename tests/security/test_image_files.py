"""Image files are untrusted input: an imported image's initramfs (unpacked on the host for
libkrun's boot folder), an image export, an OCI layer. None of them writes outside its own
folder, and none fills the disk: sizes are capped while reading (SMOL_KERNEL_MAX_IMAGE_GIB)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from smol_kernel.image.initramfs import CpioWriter
from smol_kernel.image.oci import OciError, open_image, unpack
from smol_kernel.image.portable import ImageFileError, import_image
from smol_kernel.image.store import IMAGE_FILES, GuestImage
from smol_kernel.vm.base import VmError
from smol_kernel.vm.krun import make_boot_dir

from ..image_helpers import layer, oci_layout


def fake_image(folder: Path, cpio: bytes) -> GuestImage:
    folder.mkdir(parents=True)
    for name in IMAGE_FILES:
        (folder / name).write_bytes(b"x")
    (folder / "initramfs.cpio").write_bytes(cpio)
    return GuestImage("evil", folder, {"name": "evil"})


def cpio(*entries: tuple[str, int, bytes]) -> bytes:
    w = CpioWriter()
    for name, mode, data in entries:
        w._entry(name, mode, data)  # any name and type: what a hostile file can hold
    return w.getvalue()


FILE, DIR, LINK = stat.S_IFREG | 0o755, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777


@pytest.mark.parametrize("entries", [
    [("/abs-file", FILE, b"pwned")],
    [("../escape", FILE, b"pwned")],
    [("bin/../../escape", FILE, b"pwned")],
    [("out", LINK, b"{outside}"), ("out/planted", FILE, b"pwned")],
    [("dev/sda", stat.S_IFBLK | 0o600, b"")],
])  # fmt: skip
def test_a_hostile_initramfs_writes_nothing_outside_the_boot_folder(tmp_path, entries):
    outside = tmp_path / "outside"
    outside.mkdir()
    concrete = [(n, m, d.replace(b"{outside}", str(outside).encode())) for n, m, d in entries]
    image = fake_image(tmp_path / "image", cpio(("bin", DIR, b""), *concrete))
    with pytest.raises(VmError):
        make_boot_dir(image, tmp_path / "boot")
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape").exists() and not Path("/abs-file").exists()


def test_a_plain_initramfs_unpacks(tmp_path):
    """The positive control for the test above: the same path with good entries works."""
    image = fake_image(tmp_path / "image", cpio(("bin", DIR, b""), ("init", FILE, b"#!/bin/sh"),
                                                 ("bin/sh", LINK, b"busybox")))  # fmt: skip
    make_boot_dir(image, tmp_path / "boot")
    assert (tmp_path / "boot" / "init").read_bytes() == b"#!/bin/sh"
    assert os.readlink(tmp_path / "boot" / "bin" / "sh") == "busybox"


def _image_file(path: Path, sizes: dict[str, int]) -> Path:
    """An export whose manifest claims ``sizes`` (its members are that long, zeros)."""
    files = {n: {"size": s, "sha256": hashlib.sha256(bytes(s)).hexdigest()}
             for n, s in sizes.items()}  # fmt: skip
    with tarfile.open(path, "w:gz") as tf:
        manifest = json.dumps({"name": "bomb", "files": files}).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tf.addfile(info, io.BytesIO(manifest))
        for name, size in sizes.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, io.BytesIO(bytes(size)))
    return path


def test_an_import_over_the_size_cap_is_refused_before_it_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOL_KERNEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SMOL_KERNEL_MAX_IMAGE_GIB", str(1 / 1024))  # 1 MiB
    bomb = _image_file(tmp_path / "bomb.smolimg", {n: 4 << 20 for n in IMAGE_FILES})
    assert bomb.stat().st_size < 200 << 10  # a few KiB of gzip for 12 MiB of image
    with pytest.raises(ImageFileError, match="SMOL_KERNEL_MAX_IMAGE_GIB"):
        import_image(bomb)
    store = tmp_path / "cache" / "images"
    assert not store.exists() or list(store.iterdir()) == [], "nothing is left"
    # The positive control: under the cap it imports.
    small = _image_file(tmp_path / "small.smolimg", {n: 100 << 10 for n in IMAGE_FILES})
    assert import_image(small).name == "bomb"


def test_an_oci_image_over_the_size_cap_is_refused_while_unpacking(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOL_KERNEL_MAX_IMAGE_GIB", str(1 / 1024))  # 1 MiB
    big = layer([("file", f"data/{i}", bytes(400 << 10)) for i in range(4)], compress=True)
    source = oci_layout(tmp_path / "oci", [big])
    dest = tmp_path / "root"
    dest.mkdir()
    with open_image(source) as image, pytest.raises(OciError, match="SMOL_KERNEL_MAX_IMAGE_GIB"):
        unpack(image, dest)
    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert written <= 1 << 20, "it stopped at the cap"


def test_image_list_survives_a_foreign_manifest(tmp_path, monkeypatch, capsys):
    from smol_kernel.cli import main

    monkeypatch.setenv("SMOL_KERNEL_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "images" / "foreign"
    folder.mkdir(parents=True)
    for name in IMAGE_FILES:
        (folder / name).write_bytes(b"x")
    foreign = {"files": {"root.ext4": {"size": "big"}}, "versions": [], "created": "\x1b[31m"}
    (folder / "manifest.json").write_text(json.dumps(foreign))
    assert main(["image", "list"]) == 0
    out = capsys.readouterr().out
    assert "foreign" in out and "\x1b" not in out
