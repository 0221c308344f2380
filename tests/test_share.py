"""Parsing and checking HOST:GUEST[:ro|rw] share strings (no VM needed; the attacks on
real shares are in tests/security/test_shares.py)."""

from __future__ import annotations

import os

import pytest

from smol_kernel.vm.share import MAX_SHARES, ShareError, check_shares, parse_share, split_share
from smol_kernel.vm.spec import VmSpec


def test_read_only_unless_rw(tmp_path):
    assert parse_share(f"{tmp_path}:/data").read_only
    assert parse_share(f"{tmp_path}:/data:ro").read_only
    share = parse_share(f"{tmp_path}:/data:rw")
    assert not share.read_only and share.mode == "rw"
    assert str(share) == f"{os.path.realpath(tmp_path)}:/data:rw"


def test_host_side_is_resolved_once(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert parse_share(f"{tmp_path}/link:/data").host == str(real)
    assert parse_share("real:/data", base_dir=tmp_path).host == str(real)
    assert parse_share("./real/../real:/data/", base_dir=tmp_path).guest == "/data"


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
    a = parse_share(f"{tmp_path}:/data")
    with pytest.raises(ShareError, match="overlap"):
        check_shares([a, parse_share(f"{tmp_path}:/data/sub")])
    with pytest.raises(ShareError, match="overlap"):
        check_shares([a, parse_share(f"{tmp_path}:/data:rw")])
    check_shares([a, parse_share(f"{tmp_path}:/data2")])
    many = [parse_share(f"{tmp_path}:/d{i}") for i in range(MAX_SHARES + 1)]
    with pytest.raises(ShareError, match=f"at most {MAX_SHARES}"):
        check_shares(many)


def test_spec_tells_the_guest_what_to_mount(tmp_path):
    spec = VmSpec(shares=(parse_share(f"{tmp_path}:/data"), parse_share(f"{tmp_path}:/o:rw")))
    assert spec.boot_env() == {"SMOL_SHARES": "smol0:/data:ro,smol1:/o:rw"}
    assert VmSpec().boot_env() == {}
    net = VmSpec(network=True, dns=("192.0.2.53",)).boot_env()
    assert net == {"SMOL_NET": "10.0.2.15/24,10.0.2.2,192.0.2.53"}
