"""Templates and checkpoints are restored into a user's kernels, so they are that user's
alone (issue 30, item 3): docs/deploy.md gives every user one ``SMOL_KERNEL_CACHE_DIR``, and
a template another user planted under the key a victim's kernelspec computes would have had
the victim's clones map the attacker's RAM. Each user's are in ``<cache>/templates/u<uid>``
(and ``checkpoints/u<uid>``), a folder checked to be theirs, 0700, in a parent no one else
can swap it in; files are taken only as regular files of theirs, never through a symlink.
A cache the user cannot write (images only, shared read-only) puts them in the user's own
cache instead of booting every kernel cold. No VM: the files are planted by hand."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from smol_kernel import checkpoint, template
from smol_kernel.paths import PrivateDirError

KEY = "a" * 64
OTHER = 4242  # another local user
pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="planting another user's files needs root")


@pytest.fixture
def shared_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    monkeypatch.setenv("SMOL_KERNEL_CACHE_DIR", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "own-cache"))  # (a fallback's)
    monkeypatch.delenv("SMOL_KERNEL_TEMPLATES_DIR", raising=False)
    monkeypatch.delenv("SMOL_KERNEL_CHECKPOINTS_DIR", raising=False)
    return cache


def plant_template(folder: Path, owner: int | None = None) -> None:
    folder.mkdir(parents=True, mode=0o700)
    for name in ("ram", "state", "overlay.ext4"):
        (folder / name).write_bytes(b"attacker's " + name.encode())
    (folder / "template.json").write_text(json.dumps({"key": KEY}))
    if owner is not None:
        for path in (folder, *folder.iterdir()):
            os.chown(path, owner, owner)


def plant_checkpoint(folder: Path, owner: int | None = None) -> None:
    folder.mkdir(parents=True, mode=0o700)
    (folder / "state").write_bytes(b"attacker's RAM")
    meta = {"created": 1.0, "size_bytes": 1, "paused_s": 0.1, "plan_key": "k", "memory_mib": 1}
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    if owner is not None:
        for path in (*folder.parents[:2], folder, *folder.iterdir()):
            os.chown(path, owner, owner)


def test_a_template_planted_in_the_shared_cache_is_not_loaded(shared_cache):
    """Where every user's templates were (``<cache>/templates/<key>``) is not looked at; the
    user's own folder, planted first by another user, is refused with the reason. Control:
    the same files in the user's own folder load."""
    plant_template(shared_cache / "templates" / KEY, owner=OTHER)
    (shared_cache / "templates").chmod(0o1777)  # as an admin would share it
    mine = template.templates_dir()
    assert mine == shared_cache / "templates" / f"u{os.getuid()}"
    assert template.Template.load(KEY) is None
    plant_template(mine / KEY)
    assert template.Template.load(KEY) is not None, "the probe: our own template loads"


def test_a_users_folder_made_first_by_another_user_is_refused(shared_cache):
    theirs = shared_cache / "templates" / f"u{os.getuid()}"
    plant_template(theirs / KEY, owner=OTHER)
    os.chown(theirs, OTHER, OTHER)
    with pytest.raises(PrivateDirError, match="belongs to uid 4242"):
        template.Template.load(KEY)
    with pytest.raises(PrivateDirError, match="SMOL_KERNEL_TEMPLATES_DIR"):
        template.templates_dir()


def test_a_parent_others_can_write_without_the_sticky_bit_is_refused(shared_cache):
    (shared_cache / "templates").mkdir(mode=0o777)
    (shared_cache / "templates").chmod(0o777)
    with pytest.raises(PrivateDirError, match="other users can write"):
        template.templates_dir()
    (shared_cache / "templates").chmod(0o1777)
    assert template.templates_dir().is_dir()


def test_a_shared_folder_another_user_made_is_not_where_ours_goes(shared_cache, tmp_path):
    """Review of issue 30: <cache>/templates made (1777) by another user, who as its owner
    may rename what is in it even with the sticky bit, and swap our folder after the check.
    Ours goes to our own cache then. Control: the same folder of root's is used."""
    (shared_cache / "templates").mkdir(mode=0o1777)
    (shared_cache / "templates").chmod(0o1777)
    assert template.templates_dir() == shared_cache / "templates" / f"u{os.getuid()}"
    os.chown(shared_cache / "templates", OTHER, OTHER)
    own = tmp_path / "own-cache" / "smol-kernel" / "templates" / f"u{os.getuid()}"
    assert template.templates_dir() == own


@pytest.mark.parametrize("link", ["ram", "state", "overlay.ext4"])
def test_a_template_file_that_is_a_symlink_is_not_used(shared_cache, tmp_path, link):
    mine = template.templates_dir() / KEY
    plant_template(mine)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"someone else's")
    (mine / link).unlink()
    (mine / link).symlink_to(elsewhere)
    assert template.Template.load(KEY) is None


def test_a_checkpoint_planted_in_the_shared_cache_is_not_found(shared_cache):
    plant_checkpoint(shared_cache / "checkpoints" / "kernel-1" / "cp", owner=OTHER)
    (shared_cache / "checkpoints").chmod(0o1777)
    assert checkpoint.load("kernel-1", "cp") is None
    assert checkpoint.list_checkpoints() == []
    plant_checkpoint(checkpoint.kernel_folder("kernel-1") / "cp")
    assert checkpoint.load("kernel-1", "cp") is not None, "the probe: our own loads"


def test_a_cache_the_user_cannot_write_keeps_templates_in_their_own_cache(
    shared_cache, tmp_path, monkeypatch
):  # fmt: skip
    """The admin's read-only cache (images for everyone): a user's templates go to their
    own cache, not nowhere (every start would boot cold). An immutable folder stands in for
    one the user may not write (root may write anywhere else)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "own-cache"))
    subprocess.run(["chattr", "+i", str(shared_cache)], check=True)
    try:
        templates, checkpoints = template.templates_dir(), checkpoint.checkpoints_dir()
    finally:
        subprocess.run(["chattr", "-i", str(shared_cache)], check=True)
    own = tmp_path / "own-cache" / "smol-kernel"
    assert templates == own / "templates" / f"u{os.getuid()}"
    assert checkpoints == own / "checkpoints" / f"u{os.getuid()}"
    assert templates.stat().st_mode & 0o777 == 0o700
    assert not (shared_cache / "templates").exists()
