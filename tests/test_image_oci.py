"""``smol-kernel image build --from-oci``: container images on disk (OCI layouts and
``docker save`` archives), their whiteouts, what a hostile image cannot do to the host, and
a built image that boots.

The archives are made here with tarfile from spelled-out layers; the bootable one's base
layer is the default guest image's own root (dumped with debugfs), less our agent, so the
build has to add it back."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from smol_kernel.image.oci import OciError, open_image, unpack

from .conftest import install_spec
from .image_helpers import docker_save, layer, oci_layout
from .kernel_helpers import run_cell, start_kernel, stop_kernel


def unpacked(source: Path, dest: Path) -> Path:
    dest.mkdir()
    with open_image(source) as image:
        unpack(image, dest)
    return dest


# ------------------------------------------------------------------ layers and whiteouts
LOWER = [
    ("dir", "srv"), ("file", "srv/doomed.txt", b"bye"), ("file", "srv/kept.txt", b"stays"),
    ("dir", "etc/opaque"), ("file", "etc/opaque/old.txt", b"old"),
    ("dir", "etc/opaque/sub"), ("file", "etc/opaque/sub/old2.txt", b"old"),
    ("dir", "var/gone"), ("file", "var/gone/a", b"a"),
    ("file", "usr/bin/tool", b"v1"), ("hardlink", "usr/bin/tool-alias", "usr/bin/tool"),
    ("file", "srv/owned.txt", b"mine", 1234, 0o4750),
]  # fmt: skip
UPPER = [
    ("file", "srv/.wh.doomed.txt", b""),
    ("file", "etc/opaque/new.txt", b"new"),  # before the marker: still kept
    ("file", "etc/opaque/.wh..wh..opq", b""),
    ("dir", "etc/opaque/sub"),
    ("file", "var/.wh.gone", b""),
    ("file", "usr/bin/tool", b"v2"),
]  # fmt: skip


def check_whiteouts(root: Path) -> None:
    assert not (root / "srv/doomed.txt").exists() and (root / "srv/kept.txt").read_text() == "stays"
    assert sorted(p.relative_to(root).as_posix() for p in (root / "etc/opaque").rglob("*")) == [
        "etc/opaque/new.txt", "etc/opaque/sub"]  # fmt: skip
    assert not (root / "var/gone").exists() and (root / "var").is_dir()
    assert (root / "usr/bin/tool").read_text() == "v2"
    assert (root / "usr/bin/tool-alias").read_text() == "v1"  # the lower file, linked
    assert not any(".wh." in p.name for p in root.rglob("*"))
    st = (root / "srv/owned.txt").stat()
    assert st.st_mode & 0o7777 == 0o4750  # owners too, when root unpacks:
    assert os.geteuid() != 0 or (st.st_uid, st.st_gid) == (1234, 1234)


def test_oci_layout_layers_apply_in_order_with_whiteouts(tmp_path):
    src = oci_layout(tmp_path / "img", [layer(LOWER), layer(UPPER, compress=True)])
    check_whiteouts(unpacked(src, tmp_path / "root"))


def test_docker_save_archive_and_a_tarred_layout_unpack_the_same(tmp_path):
    layers = [layer(LOWER), layer(UPPER)]
    check_whiteouts(unpacked(docker_save(tmp_path / "saved.tar", layers), tmp_path / "r1"))
    oci_layout(tmp_path / "img", layers)
    with tarfile.open(tmp_path / "layout.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "img", arcname=".")
    check_whiteouts(unpacked(tmp_path / "layout.tar.gz", tmp_path / "r2"))


@pytest.mark.skipif(
    not shutil.which("skopeo"), reason="skopeo is not installed (setup installs it)"
)
def test_layouts_written_by_skopeo_unpack_the_same(tmp_path):
    """skopeo converts a docker save archive into an OCI layout folder (gzip layers) and
    an OCI archive, as it would an image from a registry; two tags of one image are one."""
    saved = docker_save(tmp_path / "saved.tar", [layer(LOWER), layer(UPPER)])
    for dest in ("oci:{}/gz:latest", "oci-archive:{}/layout.tar", "oci:{}/gz:again"):
        flags = ["--dest-compress"] if dest.startswith("oci:") else []
        subprocess.run(["skopeo", "copy", "-q", *flags, f"docker-archive:{saved}",
                        dest.format(tmp_path)], check=True, capture_output=True)  # fmt: skip
    check_whiteouts(unpacked(tmp_path / "gz", tmp_path / "r1"))
    check_whiteouts(unpacked(tmp_path / "layout.tar", tmp_path / "r2"))
    index = json.loads((tmp_path / "gz/index.json").read_text())
    assert len(index["manifests"]) == 2  # latest and again
    manifest = json.loads(
        (tmp_path / "gz/blobs" / index["manifests"][0]["digest"].replace(":", "/")).read_text()
    )
    layer_types = [d["mediaType"] for d in manifest["layers"]]
    assert layer_types and all(t.endswith("tar+gzip") for t in layer_types), layer_types


def test_a_hostile_image_cannot_touch_host_files(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "canary").write_text("host data")
    hostile = [
        ("symlink", "abs", str(host)), ("symlink", "rel", "../../../../../../" + str(host)),
        ("symlink", "etc", str(host)),
    ]  # fmt: skip
    through = [
        ("file", "abs/pwned", b"x"), ("file", "rel/pwned2", b"x"), ("file", "../../escaped", b"x"),
        ("file", "abs/.wh.canary", b""), ("file", "etc/.wh..wh..opq", b""),
        ("symlink", "abs/canary", "/elsewhere"),
    ]  # fmt: skip
    root = unpacked(oci_layout(tmp_path / "img", [layer(hostile), layer(through)]),
                    tmp_path / "root")  # fmt: skip
    assert sorted(p.name for p in host.iterdir()) == ["canary"]
    assert (host / "canary").read_text() == "host data" and not (host / "canary").is_symlink()
    assert not (tmp_path / "escaped").exists() and (root / "escaped").read_text() == "x"
    inside = root / str(host).lstrip("/")  # where the links lead when root is "/"
    assert (inside / "pwned").exists() and (inside / "pwned2").exists()
    assert os.readlink(inside / "canary") == "/elsewhere"

    # a hard link to a host file is a link to that path inside the image: missing there
    linker = layer([("hardlink", "stolen", str(host / "canary"))])
    with pytest.raises(OciError, match=r"hard link to .*not in the image"):
        unpacked(oci_layout(tmp_path / "img2", [linker]), tmp_path / "root2")
    assert os.stat(host / "canary").st_nlink == 1


def test_damaged_or_unusable_archives_are_refused_with_the_reason(tmp_path):
    layers = [layer(LOWER, compress=True)]
    good = oci_layout(tmp_path / "good", layers)
    [blob] = [b for b in (good / "blobs/sha256").iterdir() if b.read_bytes() == layers[0]]
    bad = shutil.copytree(good, tmp_path / "bad")
    data = bytearray(blob.read_bytes())
    data[-12] ^= 0xFF  # inside the gzip trailer's reach: a different layer
    (bad / "blobs/sha256" / blob.name).write_bytes(bytes(data))
    with pytest.raises(OciError, match="is corrupt: its sha256 is"):
        unpacked(bad, tmp_path / "r1")

    cases = {
        tmp_path / "nothing": "not an OCI image layout .* `docker save`",
        tmp_path / "missing": "does not exist",
        oci_layout(tmp_path / "arm", layers, arch="arm64"): "linux/arm64",
    }
    (tmp_path / "nothing").mkdir()
    (blobless := shutil.copytree(good, tmp_path / "blobless")).joinpath(
        "blobs/sha256", blob.name
    ).unlink()
    cases[blobless] = "incomplete"
    (tmp_path / "zstd").mkdir()
    cases[oci_layout(tmp_path / "zstd/img", [b"\x28\xb5\x2f\xfd" + b"\0" * 64])] = "zstd"
    for path, message in cases.items():
        with pytest.raises(OciError, match=message):
            unpacked(path, tmp_path / f"out-{path.name}")


# ------------------------------------------------------------------ building and booting
def cli(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"SMOL_KERNEL_CACHE_DIR": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-m", "smol_kernel.cli", "image", *args],
                          capture_output=True, text=True, env=env, timeout=580)  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="image build --from-oci unpacks as root")
def test_an_image_without_python3_is_refused_and_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    src = oci_layout(tmp_path / "img", [layer([("file", "bin/sh", b"#!")])])
    r = cli("build", "--from-oci", str(src), "--name", "nopy", cache=cache)
    assert r.returncode == 2, r.stderr
    assert "no python3" in r.stderr and "python:3.12-slim" in r.stderr, r.stderr
    assert list((cache / "images").iterdir()) == []  # no image, no half-built folder

    r = cli("build", "--from-oci", str(src), cache=cache)
    assert r.returncode == 2 and "--name NAME" in r.stderr, r.stderr
    r = cli("build", "--from-oci", str(src), "--name", "x", "--preset", "scipy", cache=cache)
    assert r.returncode == 2 and "container image" in r.stderr, r.stderr


@pytest.mark.skipif(not shutil.which("fakeroot"), reason="fakeroot is not installed")
def test_fakeroot_build_failures_say_why_and_leave_nothing(tmp_path, monkeypatch):
    from smol_kernel.errors import HostToolError
    from smol_kernel.image.builder import ImageBuilder

    images = tmp_path / "images"
    src = oci_layout(tmp_path / "img", [layer([("file", "bin/sh", b"#!")])])
    builder = ImageBuilder("nopy", from_oci=src, images_root=images, fakeroot=True)
    with pytest.raises(OciError, match="the image has no python3"):
        builder.build()  # the error crossed the fakeroot helper's process boundary
    assert list(images.iterdir()) == []

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(HostToolError, match=r"needs root or fakeroot.*apt-get install fakeroot"):
        builder.build()
    assert list(images.iterdir()) == []


@pytest.fixture(scope="module")
def base_layer(image, tmp_path_factory) -> bytes:
    """The default image's root as a layer tar, without our agent (the build adds it)."""
    root = tmp_path_factory.mktemp("base") / "root"
    root.mkdir()
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    subprocess.run([debugfs, "-R", f"rdump / {root}", str(image.path / "root.ext4")],
                   check=True, capture_output=True)  # fmt: skip
    shutil.rmtree(root / "opt" / "smol-kernel")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(root, arcname=".")
    shutil.rmtree(root)
    return buf.getvalue()


def ext4_stat(root_ext4: Path, path: str) -> tuple[int, int, str]:
    """(uid, gid, mode) of ``path`` in an ext4 image, as debugfs reads it."""
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    out = subprocess.run([debugfs, "-R", f"stat {path}", str(root_ext4)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    fields = dict(re.findall(r"(User|Group|Mode):\s+(\S+)", out))
    return int(fields["User"]), int(fields["Group"]), fields["Mode"]


@pytest.mark.skipif(not shutil.which("fakeroot"), reason="fakeroot is not installed")
async def test_oci_image_builds_with_fakeroot_boots_and_shows_its_layers(
    base_layer, tmp_path, jupyter_prefix
):
    """Layer 2 deletes a file of the base and Debian's ipykernel (so the build adds one
    with pip, for the image's Python 3.11), adds files with owners and a setuid bit. Built
    as a user without root would (fakeroot; forced, as the suite runs as root): the owners
    are in the ext4 though the unpacked files never had them. The guest sees the layers."""
    from smol_kernel.image.builder import ImageBuilder

    upper = layer([
        ("file", "etc/.wh.debian_version", b""),
        ("file", "usr/lib/python3/dist-packages/.wh.ipykernel", b""),
        ("file", "srv/from-layer-2.txt", b"layer two"),
        ("file", "srv/app/data.txt", b"x", 1234, 0o640),
        ("file", "usr/bin/su-like", b"x", 0, 0o4755),
        ("file", "opt/smol-kernel/stale.py", b"x"),  # the build replaces the whole folder
    ], compress=True)  # fmt: skip
    src = docker_save(tmp_path / "saved.tar", [base_layer, upper])
    image = ImageBuilder("oci-test", from_oci=src, fakeroot=True).build(force=True)
    try:
        versions = image.manifest["versions"]
        assert versions["owners"] == "fakeroot" and versions["python"].startswith("3.11")
        assert versions["ipykernel"] == "added with pip"
        root = image.path / "root.ext4"
        assert ext4_stat(root, "/srv/app/data.txt") == (1234, 1234, "0640")
        assert ext4_stat(root, "/usr/bin/su-like") == (0, 0, "04755")
        assert ext4_stat(root, "/opt/smol-kernel/agent.py")[:2] == (0, 0)
        assert not list(image.path.parent.glob(".build-oci-test-*"))
        r = cli("build", "--from-oci", str(src), "--name", "oci-test")
        assert r.returncode == 0 and "up to date" in r.stdout + r.stderr, r.stderr

        spec = install_spec(jupyter_prefix, "smolvm-oci", "--image", "oci-test",
                            "--memory-mib", "768", "--pool-size", "0")  # fmt: skip
        km, kc = await start_kernel(spec)
        try:
            code = (
                "import os, ipykernel\n"
                "print(os.path.exists('/etc/debian_version'), open('/srv/from-layer-2.txt').read(),"
                " ipykernel.__file__.startswith('/usr/local/lib/python3.11/dist-packages/'),"
                " os.stat('/srv/app/data.txt').st_uid,"
                " {'agent.py', 'stale.py'} & set(os.listdir('/opt/smol-kernel')))"
            )
            r = await run_cell(kc, code)
            assert r.stdout.split() == ["False", "layer", "two", "True", "1234", "{'agent.py'}"], (
                r.stdout + r.stderr
            )
        finally:
            await stop_kernel(km, kc)
    finally:
        shutil.rmtree(image.path)
