"""Parsing and checking HOST:GUEST[:ro|rw] share strings (no VM needed; the attacks on
real shares are in tests/security/test_shares.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smol_kernel.vm.share import (
    MAX_SHARES,
    ShareError,
    check_shares,
    open_share,
    parse_share,
    split_share,
)
from smol_kernel.vm.spec import VmSpec


def test_read_only_unless_rw(tmp_path):
    assert parse_share(f"{tmp_path}:/data").read_only
    assert parse_share(f"{tmp_path}:/data:ro").read_only
    share = parse_share(f"{tmp_path}:/data:rw")
    assert not share.read_only and share.mode == "rw"
    assert str(share) == f"{tmp_path}:/data:rw"


def test_host_side_follows_no_symlink_and_is_known_by_identity(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ShareError, match=r"link is a symbolic link .* by its real path"):
        parse_share(f"{tmp_path}/link:/data")
    (real / "sub").mkdir()
    (tmp_path / "up").symlink_to(tmp_path)  # a link in the middle of the path, too
    with pytest.raises(ShareError, match="up is a symbolic link"):
        parse_share(f"{tmp_path}/up/real/sub:/data")
    share = parse_share("real:/data", base_dir=tmp_path)
    assert share.host == str(real) and share.ident == (real.stat().st_dev, real.stat().st_ino)
    assert parse_share("./real/../real:/data/", base_dir=tmp_path).guest == "/data"
    # Replaced after planning (what a guest with a rw share of the parent could do):
    # the VM start opens the path again and refuses the other folder.
    fd = open_share(share)
    os.close(fd)
    real.rename(tmp_path / "moved")
    (tmp_path / "real").mkdir()
    with pytest.raises(ShareError, match="no longer the folder"):
        open_share(share)
    (tmp_path / "real").rmdir()
    (tmp_path / "real").symlink_to(tmp_path / "moved")
    with pytest.raises(ShareError, match="symbolic link"):
        open_share(share)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "expected HOST:GUEST"),
        ("/tmp", "guest path is missing"),
        (":/data", "host folder is empty"),
        ("{tmp}/missing:/data", "does not exist; create it first"),
        ("{tmp}/file:/data", "is not a folder"),
        ("{tmp}:data", "must be absolute"),
        ("{tmp}:/da ta", "may only contain"),
        ("{tmp}:/", "below /"),
        ("{tmp}:/data/../etc", "below /"),
        ("{tmp}:/proc/x", "guest system folder"),
        ("{tmp}:/opt/smol-kernel", "guest system folder"),
        ("{tmp}:/usr", "guest system folder"),
    ],
)
def test_bad_shares_say_what_is_wrong(tmp_path, text, match):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ShareError, match=match):
        parse_share(text.format(tmp=tmp_path))


def test_syntax_is_checked_without_the_host(tmp_path):
    assert split_share("data:/data:rw") == ("data", "/data", False)
    with pytest.raises(ShareError, match="must be absolute"):
        split_share("data:data")


def test_overlapping_or_too_many_shares_are_refused(tmp_path):
    for name in ("a", "b", "a/inner"):
        (tmp_path / name).mkdir()
    a = parse_share(f"{tmp_path}/a:/data")
    b = parse_share(f"{tmp_path}/b:/data2")
    with pytest.raises(ShareError, match="overlap"):
        check_shares([a, parse_share(f"{tmp_path}/b:/data/sub")])
    with pytest.raises(ShareError, match="overlap"):
        check_shares([a, parse_share(f"{tmp_path}/b:/data:rw")])
    check_shares([a, b])  # the positive control
    # one host folder twice (read-only and writable), or one inside the other
    with pytest.raises(ShareError, match="same host folder or one holds the other"):
        check_shares([a, parse_share(f"{tmp_path}/a:/other:rw")])
    with pytest.raises(ShareError, match="same host folder or one holds the other"):
        check_shares([a, parse_share(f"{tmp_path}/a/inner:/other:rw")])
    with pytest.raises(ShareError, match="same host folder or one holds the other"):
        check_shares([parse_share(f"{tmp_path}:/top"), b])
    many = []
    for i in range(MAX_SHARES + 1):
        (tmp_path / f"d{i}").mkdir()
        many.append(parse_share(f"{tmp_path}/d{i}:/d{i}"))
    with pytest.raises(ShareError, match=f"at most {MAX_SHARES}"):
        check_shares(many)


def test_spec_tells_the_guest_what_to_mount(tmp_path):
    (tmp_path / "o").mkdir()
    spec = VmSpec(shares=(parse_share(f"{tmp_path}:/data"), parse_share(f"{tmp_path}/o:/o:rw")))
    assert spec.boot_env() == {"SMOL_SHARES": "smol0:/data:ro,smol1:/o:rw"}
    assert VmSpec().boot_env() == {}
    net = VmSpec(network=True, dns=("192.0.2.53",)).boot_env()
    assert net == {"SMOL_NET": "10.0.2.15/24,10.0.2.2,192.0.2.53"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder of our own, with the folders of secrets people have."""
    home = tmp_path / "home"
    for name in (".ssh", ".aws", ".config/gcloud", "projects/data"):
        (home / name).mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return home


def test_secret_folders_are_refused_even_read_only(home, tmp_path):
    from jupyter_core.paths import jupyter_runtime_dir

    from smol_kernel.paths import runtime_dir

    for secret in (home / ".ssh", home / ".aws", home / ".config" / "gcloud",
                   Path(jupyter_runtime_dir()), runtime_dir()):  # fmt: skip
        secret.mkdir(parents=True, exist_ok=True)
        with pytest.raises(ShareError, match="a guest must not see it"):
            parse_share(f"{secret}:/data:ro")
    with pytest.raises(ShareError, match=r"home contains .*a guest must not see it"):
        parse_share(f"{home}:/data:ro")  # the home folder holds them
    assert parse_share(f"{home}/projects/data:/data:ro").read_only  # the positive control


def test_the_home_folder_needs_the_administrators_word(home):
    (home / ".ssh").rmdir()
    (home / ".aws").rmdir()
    (home / ".config" / "gcloud").rmdir()
    (home / ".config").rmdir()
    with pytest.raises(ShareError, match="allow_home_share"):
        parse_share(f"{home}:/home:ro")
    share = parse_share(f"{home}:/home:ro", allow_home=True)
    assert share.home_allowed
    os.close(open_share(share))
    with pytest.raises(
        ShareError, match=r"must not see it\. Share a folder that holds only your data$"
    ):
        parse_share(f"{home}:/home:rw", allow_home=True)  # read-only at most


def test_every_path_entry_is_protected_from_rw_shares(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "bin").mkdir(parents=True)
    (project / "node_modules" / ".bin").mkdir(parents=True)
    monkeypatch.chdir(project)
    monkeypatch.setenv("PATH", f"bin:{project}/node_modules/.bin:{os.environ['PATH']}")
    for folder in (project, project / "bin", project / "node_modules"):
        with pytest.raises(ShareError, match=r"a folder on PATH"):
            parse_share(f"{folder}:/work:rw")
        assert parse_share(f"{folder}:/work:ro").read_only  # reading is fine


def test_a_protected_folder_not_made_yet_is_protected(home, tmp_path, monkeypatch):
    """Issue 30: a rw share of ~/.local/lib was accepted while site-packages was missing;
    the guest then made it and dropped a .pth file the host's Python would run. The user's
    site-packages is protected before it exists; a share beside its path is not refused
    (the control), nor a read-only one."""
    import site

    future = home / ".local" / "lib" / "python3" / "site-packages"
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(future))
    (home / ".local" / "lib").mkdir(parents=True)
    (home / ".local" / "other").mkdir()
    assert not future.exists()
    for folder in (home / ".local", home / ".local" / "lib"):
        with pytest.raises(ShareError, match=r"would contain \(once it is created\)"):
            parse_share(f"{folder}:/work:rw")
        assert parse_share(f"{folder}:/work:ro").read_only
    assert not parse_share(f"{home}/.local/other:/work:rw").read_only


@pytest.mark.skipif(os.getuid() != 0, reason="a bind mount needs root")
def test_a_bind_mount_of_a_protected_folder_is_the_same_folder(tmp_path):
    import subprocess

    from smol_kernel.trusted import import_root

    mount = tmp_path / "mnt"
    mount.mkdir()
    source = import_root("smol_kernel")
    subprocess.run(["mount", "--bind", source, str(mount)], check=True)
    try:
        with pytest.raises(ShareError, match="smol-kernel's own code"):
            parse_share(f"{mount}:/src:rw")
    finally:
        subprocess.run(["umount", str(mount)], check=True)
