"""``smol-kernel image export`` / ``import``: one portable file per image, verified on
import. The format checks run on a small image of real files in a private cache; one test
exports the real default image, imports it under another name and boots a kernel from it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from smol_kernel.image.portable import ImageFileError, export_image, import_image
from smol_kernel.image.store import IMAGE_FILES, GuestImage

from .conftest import install_spec
from .kernel_helpers import run_cell, start_kernel, stop_kernel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache holding image 'small': real files, a real manifest."""
    monkeypatch.setenv("SMOL_KERNEL_CACHE_DIR", str(tmp_path / "cache"))
    image = tmp_path / "cache" / "images" / "small"
    image.mkdir(parents=True)
    files = {}
    for i, name in enumerate(IMAGE_FILES):
        data = os.urandom(3000 + i) * 50
        (image / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"name": "small", "versions": {"kernel_release": "6.1-test"}, "files": files}
    (image / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "cache" / "images"


def entries(store) -> set[str]:
    return {p.name for p in store.iterdir()}


@pytest.mark.parametrize("compress", [False, True])
def test_export_import_round_trip(cache, tmp_path, compress):
    out = tmp_path / "small.smolimg"
    digest = export_image("small", out, compress=compress)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
    image = import_image(out, name="copy", expected_sha256=digest)
    for name in IMAGE_FILES:
        assert (image.path / name).read_bytes() == (cache / "small" / name).read_bytes()
    assert image.manifest["name"] == "copy" and image.kernel_release == "6.1-test"
    with pytest.raises(ImageFileError, match="exists; pass --name NEW or --force"):
        import_image(out, name="copy")
    assert import_image(out, name="copy", force=True).name == "copy"
    assert entries(cache) == {"small", "copy"}


def rewrite(src, dest, change) -> None:
    """Copy an export member by member, letting ``change(name, data)`` alter contents."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            data = change(m.name, tin.extractfile(m).read())
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def test_corrupt_truncated_and_tampered_files_are_refused_leaving_nothing(cache, tmp_path):
    good = tmp_path / "good.smolimg"
    digest = export_image("small", good)
    before = entries(cache)
    data = good.read_bytes()

    def refused(blob_or_path, match, **kw) -> None:
        path = blob_or_path
        if isinstance(blob_or_path, bytes):
            path = tmp_path / "bad.smolimg"
            path.write_bytes(blob_or_path)
        with pytest.raises(ImageFileError, match=match):
            import_image(path, name="bad", **kw)
        assert entries(cache) == before, "a refused import must leave nothing behind"

    refused(data[: len(data) // 2], "truncated")
    refused(data[:-20_000], "truncated|incomplete")  # inside the last file (not padding)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside a file's bytes
    refused(bytes(flipped), "does not match its sha256")
    refused(b"not a tar at all" * 100, "not a smol-kernel image file|truncated or corrupt")
    refused(gzip.compress(data)[:5000], "truncated or corrupt")

    tampered = tmp_path / "tampered.smolimg"
    rewrite(good, tampered, lambda n, d: d.replace(d[:10], b"X" * 10) if n == "vmlinux" else d)
    refused(tampered, "does not match its sha256")

    # the attacker also fixes the manifest: only the whole-file sha256 catches that
    def forge(name, d):
        if name == "vmlinux":
            return b"evil" + d[4:]
        if name == "manifest.json":
            m = json.loads(d)
            data = b"evil" + (cache / "small" / "vmlinux").read_bytes()[4:]
            m["files"]["vmlinux"]["sha256"] = hashlib.sha256(data).hexdigest()
            return json.dumps(m).encode()
        return d

    forged = tmp_path / "forged.smolimg"
    rewrite(good, forged, forge)
    refused(forged, "does not have the sha256 you gave", expected_sha256=digest)

    linked = tmp_path / "linked.smolimg"
    with tarfile.open(linked, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    refused(linked, "not a regular file")
    extra = tmp_path / "extra.smolimg"
    rewrite(good, extra, lambda n, d: d)
    with tarfile.open(extra, "a") as tar:
        info = tarfile.TarInfo("../../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    refused(extra, "unexpected")


def test_cli_errors_are_clear(cache, tmp_path):
    cli = [sys.executable, "-m", "smol_kernel.cli", "image"]
    env = {**os.environ, "SMOL_KERNEL_CACHE_DIR": str(cache.parent)}
    r = subprocess.run([*cli, "import", str(tmp_path / "missing.smolimg")],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 2 and "is not a file" in r.stderr
    r = subprocess.run([*cli, "export", "nope", str(tmp_path / "x")],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 2 and "not built" in r.stderr and not (tmp_path / "x").exists()
    r = subprocess.run([*cli, "export", "small", str(tmp_path / "s.img")],
                       capture_output=True, text=True, env=env, check=True)  # fmt: skip
    digest = r.stdout.split("sha256 ")[1].split()[0]
    r = subprocess.run([*cli, "import", str(tmp_path / "s.img"), "--name", "again",
                        "--sha256", digest], capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0 and "imported image 'again'" in r.stdout, r.stderr


@pytest.mark.vm
async def test_an_imported_image_boots_like_a_built_one(image, jupyter_prefix, tmp_path):
    out = tmp_path / "default.smolimg"
    export_image(image.name, out)
    imported = import_image(out, name="imported-test", force=True)
    try:
        spec = install_spec(jupyter_prefix, "smolvm-imported", "--image", "imported-test",
                            "--memory-mib", "640")  # fmt: skip
        km, kc = await start_kernel(spec)
        try:
            r = await run_cell(kc, "import platform\nprint(platform.release())")
            assert r.stdout.strip() == imported.kernel_release == image.kernel_release
        finally:
            await stop_kernel(km, kc)
    finally:
        GuestImage.load("imported-test")  # still there: remove it
        import shutil

        shutil.rmtree(imported.path)
