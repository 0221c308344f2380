"""Guest image builder and store: rebuild rules, listing, and every build failure path."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time

import pytest

from smol_kernel.cli import main
from smol_kernel.errors import HostToolError
from smol_kernel.image.builder import ImageBuilder, ImageBuildError, extract_vmlinux
from smol_kernel.image.initramfs import CpioWriter, ModuleError, read_cpio, resolve_modules
from smol_kernel.image.store import GuestImage, ImageNotFound, check_name


def test_built_image_has_manifest_with_inputs_versions_and_hashes(image):
    m = image.manifest
    assert m["input_hash"] == ImageBuilder(name=image.name).input_hash()
    assert m["versions"]["kernel_release"] == image.kernel_release
    assert m["versions"]["python3-ipykernel"]
    for name in ("root.ext4", "vmlinux", "initramfs.cpio"):
        assert m["files"][name]["size"] == (image.path / name).stat().st_size
        assert len(m["files"][name]["sha256"]) == 64
    assert (image.path / "vmlinux").read_bytes()[:4] == b"\x7fELF"


def test_network_and_share_modules_load_only_when_asked_for(image):
    files = {name: data for name, _, data in read_cpio(image.initramfs.read_bytes())}
    lists = {n: files[n].decode().split() for n in ("modules.order", "modules.net", "modules.9p")}
    assert "virtio_blk.ko" in lists["modules.order"] and "ext4.ko" in lists["modules.order"]
    assert lists["modules.net"][-1] == "virtio_net.ko" and "failover.ko" in lists["modules.net"]
    assert lists["modules.9p"][-1] == "9p.ko" and "9pnet_virtio.ko" in lists["modules.9p"]
    base = set(lists["modules.order"])
    assert not base & (set(lists["modules.net"]) | set(lists["modules.9p"])), "loaded twice"
    for names in lists.values():
        assert all(f"lib/modules/{n}" in files for n in names)


def test_unchanged_inputs_do_not_rebuild(image):
    t0 = time.monotonic()
    again = ImageBuilder(name=image.name).build()
    assert time.monotonic() - t0 < 5
    assert again.manifest["created"] == image.manifest["created"]


def test_changed_inputs_change_the_hash():
    base = ImageBuilder().input_hash()
    assert ImageBuilder(apt=["jq"]).input_hash() != base
    assert ImageBuilder(pip=["rich"]).input_hash() != base
    assert ImageBuilder(apt=["jq", "jq"]).input_hash() == ImageBuilder(apt=["jq"]).input_hash()


def test_missing_mmdebstrap_says_how_to_install(tmp_path):
    b = ImageBuilder(name="t", images_root=tmp_path / "imgs", mmdebstrap="/nonexistent/mmdebstrap")
    with pytest.raises(HostToolError, match="apt-get install mmdebstrap"):
        b.build()
    assert not (tmp_path / "imgs").exists() or not list((tmp_path / "imgs").iterdir())


def test_unknown_apt_package_surfaces_apts_message_and_leaks_nothing(tmp_path):
    root = tmp_path / "imgs"
    b = ImageBuilder(name="t", apt=["no-such-package-smol-kernel"], images_root=root)
    with pytest.raises(ImageBuildError, match="no-such-package-smol-kernel"):
        b.build()
    assert list(root.iterdir()) == [], "a failed build must remove its work dir"


def test_requirements_file_with_a_missing_package_surfaces_pips_message(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# data tools\nno-such-package-smol-kernel-xyz==1.0\n")
    root = tmp_path / "imgs"
    b = ImageBuilder(name="t", requirements=reqs, images_root=root)
    with pytest.raises(ImageBuildError, match="no-such-package-smol-kernel-xyz"):
        b.build()
    assert list(root.iterdir()) == [], "nothing half-built is left"
    assert "no-such-package" in b.inputs()["requirements"], "the file's content is an input"


def test_presets_and_requirements_are_inputs(tmp_path):
    base = ImageBuilder().input_hash()
    scipy = ImageBuilder(name="scipy", preset="scipy")
    assert {"python3-numpy", "python3-pandas", "python3-matplotlib"} <= set(scipy.apt)
    assert scipy.input_hash() != base
    reqs = tmp_path / "r.txt"
    reqs.write_text("rich\n")
    assert ImageBuilder(requirements=reqs).input_hash() != base
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ImageBuilder(preset="nope")
    with pytest.raises(ValueError, match="cannot read the requirements file"):
        ImageBuilder(requirements=tmp_path / "missing.txt")


@contextlib.contextmanager
def small_mount(path, options: str):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_no_permission_is_a_clear_error(tmp_path):
    with (
        small_mount(tmp_path / "ro", "ro,size=1m") as ro,
        pytest.raises(ImageBuildError, match="no permission to write"),
    ):
        ImageBuilder(name="t", images_root=ro / "imgs").build()


def test_disk_full_is_a_clear_error(tmp_path):
    with small_mount(tmp_path / "tiny", "size=16m") as tiny:
        with pytest.raises(ImageBuildError, match=r"disk full: \d+ MiB free"):
            ImageBuilder(name="t", images_root=tiny / "imgs").build()
        assert not (tiny / "imgs").exists() or not list((tiny / "imgs").iterdir())


@pytest.mark.parametrize("name", ["", "../x", "a b", "-x", "x" * 65])
def test_bad_image_names_are_rejected(name):
    with pytest.raises(ValueError, match="invalid image name"):
        check_name(name)


def test_bad_package_names_are_rejected():
    with pytest.raises(ValueError, match="invalid apt package"):
        ImageBuilder(apt=["--evil"])


def test_extract_vmlinux_rejects_non_kernels(tmp_path):
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(b"not a kernel" * 100)
    with pytest.raises(ImageBuildError, match="cannot find"):
        extract_vmlinux(bogus, tmp_path / "out")


def test_missing_module_is_named(tmp_path):
    with pytest.raises(ModuleError, match="virtio_blk"):
        resolve_modules(tmp_path, ["virtio_blk"])


def test_cpio_is_newc_and_padded():
    w = CpioWriter()
    w.file("init", b"#!/bin/sh\n", 0o755)
    data = w.getvalue()
    assert data.startswith(b"070701") and len(data) % 512 == 0
    assert b"TRAILER!!!" in data


def test_image_list_and_rm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMOL_KERNEL_CACHE_DIR", str(tmp_path))
    img = tmp_path / "images" / "scratch"
    img.mkdir(parents=True)
    for f in ("root.ext4", "vmlinux", "initramfs.cpio"):
        (img / f).write_bytes(b"x")
    manifest = {"created": "2026-01-01T00:00:00Z", "inputs": {"apt": ["jq"], "pip": []},
                "versions": {"kernel_release": "6.1.0-test"},
                "files": {"root.ext4": {"size": 1}}}  # fmt: skip
    (img / "manifest.json").write_text(json.dumps(manifest))
    assert main(["image", "list"]) == 0
    out = capsys.readouterr().out
    assert "scratch" in out and "6.1.0-test" in out and "jq" in out
    assert main(["image", "rm", "scratch"]) == 0
    assert not img.exists()
    assert main(["image", "rm", "scratch"]) == 2
    assert "no guest image named 'scratch'" in capsys.readouterr().err
    with pytest.raises(ImageNotFound, match="smol-kernel image build --name scratch"):
        GuestImage.load("scratch")
