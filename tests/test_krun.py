"""libkrun binding and launcher, against a recording stand-in library built from C here.

The stand-in (tests/krun_stub/krun_stub.c) replaces libkrun.so.1 for the binding and the
launcher only: it records every call and its arguments. It never stands in for a VM -- the
end-to-end libkrun tests are the backend-parametrized kernel tests, which skip here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from smol_kernel.egress.netfilter import GUEST_MAC
from smol_kernel.guest.protocol import CHANNEL_PORTS, CONTROL_PORT
from smol_kernel.vm.base import BackendUnavailable, VmError
from smol_kernel.vm.krun import (
    KrunBackend,
    launcher_argv,
    launcher_config,
    make_boot_dir,
    vsock_socket_path,
)
from smol_kernel.vm.krun_binding import COMPAT_NET_FEATURES, Krun, KrunError, KrunLoadError
from smol_kernel.vm.krun_launcher import LAUNCHER_FAILED
from smol_kernel.vm.select import select_backend
from smol_kernel.vm.share import parse_share
from smol_kernel.vm.spec import VmSpec

STUB_SRC = Path(__file__).parent / "krun_stub" / "krun_stub.c"


@pytest.fixture(scope="session")
def stubs(tmp_path_factory) -> dict[str, str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build the libkrun stand-in (apt-get install gcc)")
    out = tmp_path_factory.mktemp("krun-stub")
    libs = {}
    for name, flags in (
        ("full", []),
        ("old", ["-DSTUB_OLD"]),
        ("noblk", ["-DSTUB_NO_BLK"]),
        ("noextras", ["-DSTUB_NO_EXTRAS"]),
    ):
        lib = out / f"libkrun-{name}.so.1"
        subprocess.run([cc, "-shared", "-fPIC", "-Wall", *flags, "-o", str(lib), str(STUB_SRC)],
                       check=True)  # fmt: skip
        libs[name] = str(lib)
    return libs


def run_launcher(
    cfg: dict, tmp_path: Path, extra_env: dict | None = None, pass_fds: tuple[int, ...] = ()
):
    cfg_path = tmp_path / "launcher.json"
    cfg_path.write_text(json.dumps(cfg))
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "KRUN_STUB_LOG": str(log), "SMOL_TEST_HOST_SECRET": "host-only",
           **(extra_env or {})}  # fmt: skip
    r, w = os.pipe()  # an inherited descriptor the launcher must close
    try:
        proc = subprocess.run(
            launcher_argv(cfg_path), env=env, cwd=tmp_path, capture_output=True, text=True,
            pass_fds=(r, *pass_fds), timeout=60,
        )  # fmt: skip
    finally:
        os.close(r)
        os.close(w)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


@pytest.fixture
def vm_dir(tmp_path, image):
    rt = tmp_path / "rt"
    rt.mkdir()
    make_boot_dir(image, rt / "boot")
    return rt


def test_launcher_call_sequence(stubs, image, vm_dir, tmp_path):
    spec = VmSpec(vcpus=2, memory_mib=768)
    cfg = launcher_config(spec, image, vm_dir, {"libkrun": stubs["full"]})
    proc, calls = run_launcher(cfg, tmp_path, {"KRUN_STUB_EXIT": "42"})
    assert proc.returncode == 42, "the parent must get the guest's exit status"
    names = [c["fn"] for c in calls]
    ports = sorted([CONTROL_PORT, *CHANNEL_PORTS.values()])
    assert names == [
        "krun_set_log_level", "krun_create_ctx", "krun_set_vm_config", "krun_set_root",
        "krun_add_disk2", "krun_add_disk2",
        "krun_disable_implicit_vsock", "krun_add_vsock",
        *["krun_add_vsock_port2"] * len(ports),
        "krun_set_console_output", "krun_set_workdir", "krun_set_exec", "krun_start_enter",
    ]  # fmt: skip
    by = {c["fn"]: c for c in calls}
    assert all(c.get("ctx", 7) == 7 for c in calls)
    assert by["krun_set_vm_config"]["vcpus"] == 2 and by["krun_set_vm_config"]["ram_mib"] == 768
    assert by["krun_set_root"]["path"] == str(vm_dir / "boot")
    disks = [c for c in calls if c["fn"] == "krun_add_disk2"]
    assert [(d["id"], d["path"], d["read_only"]) for d in disks] == [
        ("root", str(image.root_disk), True),
        ("rw", str(vm_dir / "overlay.ext4"), False),
    ]
    assert by["krun_add_vsock"]["tsi_features"] == 0, "no TSI hijack flags: no network"
    vsock = [c for c in calls if c["fn"] == "krun_add_vsock_port2"]
    assert [v["port"] for v in vsock] == ports
    for v in vsock:
        assert v["listen"] is True
        assert v["path"] == str(vm_dir / f"v-{v['port']}.sock")
        assert len(v["path"].encode()) <= 107, "must fit in sun_path"
    ex = by["krun_set_exec"]
    assert ex["exec"] == "/init"
    assert ex["argv"] == [] and "unterminated" not in ex
    assert ex["envp"] == ["KRUN_INIT_PID1=1", "SMOL_LIBKRUN=1", "PATH=/bin"]
    assert not any("SMOL_TEST_HOST_SECRET" in e for e in ex["envp"]), "host env leaked"
    assert by["krun_set_console_output"]["path"] == str(vm_dir / "console.log")
    assert by["krun_start_enter"]["open_fds"] == [0, 1, 2], "inherited fds must be closed"
    # The VMM could not write into the guest's root (libkrun shares it read-write): the
    # launcher made it read-only for itself; the same folder stays writable for us.
    assert by["krun_start_enter"]["root_writable"] == 0
    (Path(cfg["root_dir"]) / "ours.txt").write_text("the host may still write here")


def test_launcher_adds_network_and_shares(stubs, image, vm_dir, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    shares = (parse_share(f"{tmp_path}/ro:/data"), parse_share(f"{tmp_path}/rw:/out:rw"))
    spec = VmSpec(network=True, shares=shares)
    vm_end, passt_end = socket.socketpair()
    with vm_end, passt_end:
        fd = vm_end.fileno()
        cfg = launcher_config(spec, image, vm_dir, {"libkrun": stubs["full"]}, net_fd=fd)
        proc, calls = run_launcher(cfg, tmp_path, pass_fds=(fd,))
    assert proc.returncode == 0, proc.stderr
    names = [c["fn"] for c in calls]
    assert names.index("krun_add_virtiofs3") > names.index("krun_set_root")
    assert names.index("krun_add_net_unixstream") > names.index("krun_add_vsock")
    assert names.index("krun_add_net_unixstream") < names.index("krun_start_enter")
    by = {c["fn"]: c for c in calls}
    ro, rw = by["krun_add_virtiofs3"], by["krun_add_virtiofs"]
    assert (ro["tag"], ro["path"], ro["read_only"]) == ("smol0", f"{tmp_path}/ro", True)
    assert (rw["tag"], rw["path"]) == ("smol1", f"{tmp_path}/rw")
    net = by["krun_add_net_unixstream"]
    assert net["path"] is None and net["fd"] == fd and net["fd_target"].startswith("socket:")
    assert net["mac"] == GUEST_MAC and net["features"] == COMPAT_NET_FEATURES
    assert by["krun_add_vsock"]["tsi_features"] == 0, "network goes through passt, not TSI"
    assert by["krun_start_enter"]["open_fds"] == [0, 1, 2, fd], "only the net link is kept"
    env = by["krun_set_exec"]["envp"]
    assert "SMOL_SHARES=smol0:/data:ro,smol1:/out:rw" in env
    assert any(e.startswith("SMOL_NET=10.0.2.15/24,") for e in env)


def test_missing_network_or_readonly_share_support_is_refused(stubs, image, tmp_path, vm_dir):
    backend = KrunBackend(libkrun=stubs["noextras"])
    with pytest.raises(BackendUnavailable, match="NET=1"):
        backend._validate(VmSpec(network=True))
    ro = parse_share(f"{tmp_path}:/data")
    with pytest.raises(BackendUnavailable, match=r"1\.18.*:rw"):
        backend._validate(VmSpec(shares=(ro,)))
    backend._validate(VmSpec(shares=(parse_share(f"{tmp_path}:/data:rw"),)))
    # The launcher checks too, and never falls back to a writable share.
    cfg = launcher_config(VmSpec(shares=(ro,)), image, vm_dir, {"libkrun": stubs["noextras"]})
    proc, calls = run_launcher(cfg, tmp_path)
    assert proc.returncode == LAUNCHER_FAILED and "krun_add_virtiofs3" in proc.stderr
    assert not any(c["fn"].startswith("krun_add_virtiofs") for c in calls)


@pytest.mark.parametrize(
    ("failing", "rc", "errname"),
    [("krun_add_vsock_port2", -17, "EEXIST"), ("krun_set_vm_config", -22, "EINVAL"),
     ("krun_start_enter", -2, "ENOENT")],
)  # fmt: skip
def test_launcher_reports_errno_and_frees_ctx(stubs, image, vm_dir, tmp_path, failing, rc,
                                              errname):  # fmt: skip
    cfg = launcher_config(VmSpec(), image, vm_dir, {"libkrun": stubs["full"]})
    proc, calls = run_launcher(cfg, tmp_path, {"KRUN_STUB_FAIL": f"{failing}:{rc}"})
    assert proc.returncode == LAUNCHER_FAILED
    assert f"{failing} failed: {errname} ({os.strerror(-rc)})" in proc.stderr
    names = [c["fn"] for c in calls]
    if failing != "krun_start_enter":
        assert names[-1] == "krun_free_ctx", "a failed context must be freed"
        assert "krun_start_enter" not in names


def test_binding_maps_negative_returns_to_errors(stubs, monkeypatch):
    k = Krun(stubs["full"])
    monkeypatch.setenv("KRUN_STUB_FAIL", "krun_set_workdir:-1")
    with pytest.raises(KrunError) as info:
        k.call("krun_set_workdir", 7, k.cstr("/"))
    assert info.value.errno == 1 and info.value.function == "krun_set_workdir"
    assert "EPERM" in str(info.value)
    assert k.call("krun_create_ctx") == 7


def test_too_old_library_is_refused_with_the_reason(stubs, image):
    with pytest.raises(KrunLoadError, match=r"too old.*krun_disable_implicit_vsock.*1\.17"):
        Krun(stubs["old"])
    status = KrunBackend(libkrun=stubs["old"]).check(image.name)
    assert not status.available and "too old" in status.reason


def test_library_without_block_support_is_refused(stubs, image):
    status = KrunBackend(libkrun=stubs["noblk"]).check(image.name)
    assert not status.available
    assert "block-device support" in status.reason and "BLK=1" in status.fix


def test_missing_library_says_how_to_install():
    status = KrunBackend(libkrun="/nonexistent/libkrun.so.1").check()
    assert not status.available
    assert "cannot load /nonexistent/libkrun.so.1" in status.reason
    assert "dnf install libkrun" in status.fix and "brew install libkrun" in status.fix


def test_socket_paths_must_fit_sun_path(tmp_path):
    assert vsock_socket_path(tmp_path, 1024).name == "v-1024.sock"
    with pytest.raises(VmError, match="SMOL_KERNEL_RUNTIME_DIR"):
        vsock_socket_path(tmp_path / ("d" * 120), 1024)


def test_boot_dir_is_a_private_copy_without_modules(image, vm_dir):
    boot = vm_dir / "boot"
    assert os.access(boot / "bin" / "busybox", os.X_OK)
    assert (boot / "init").read_bytes().startswith(b"#!/bin/busybox sh")
    for lst in ("modules.order", "modules.net", "modules.9p"):
        assert (boot / lst).read_text() == "", "libkrun's kernel has its drivers built in"
    assert not (boot / "lib" / "modules").exists() or not any((boot / "lib" / "modules").iterdir())
    assert (boot / "bin" / "busybox").stat().st_ino != image.initramfs.stat().st_ino


def test_auto_selection_explains_why_libkrun_was_skipped(image):
    sel = select_backend("auto", image.name)
    krun = KrunBackend().check(image.name)
    if krun.available:
        assert sel.backend is not None and sel.backend.name == "libkrun"
    else:
        assert any(s.startswith("libkrun: skipped") for s in sel.steps), sel.steps
        assert sel.backend is not None and sel.backend.name == "qemu"


def test_a_rw_share_never_goes_to_libkrun(image):
    """libkrun's virtio-fs server writes the guest's file modes (setuid, 0777) to host files
    of a rw share: auto skips it then and says why, and asking for libkrun with a rw share is
    refused with what to do. Control: without a rw share, libkrun is tried as before."""
    sel = select_backend("auto", image.name, writable_shares=True)
    assert any(s.startswith("libkrun: skipped for a rw share") for s in sel.steps), sel.steps
    assert sel.backend is not None and sel.backend.name == "qemu"
    sel = select_backend("libkrun", image.name, writable_shares=True)
    assert sel.backend is None and sel.error is not None
    assert "setuid" in sel.error.reason and "backend='qemu'" in sel.error.fix
    plain = select_backend("libkrun", image.name)
    assert not any("rw share" in s for s in plain.steps), plain.steps
