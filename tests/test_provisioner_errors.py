"""Every way a smolvm kernel can fail to start gives a clear error and leaks nothing."""

from __future__ import annotations

import re
import socket

import pytest
from jupyter_client.manager import AsyncKernelManager

from smol_kernel import paths
from smol_kernel.vm.qemu import QemuBackend

from .conftest import close_warm_pool, install_spec, processes_mentioning, runtime_entries


def flat(error: BaseException) -> str:
    return " ".join(str(error).split())


async def expect_start_failure(
    spec: str, match: str, start_kw: dict | None = None, **km_kw
) -> AsyncKernelManager:
    close_warm_pool()  # a pooled VM of an earlier test could be recycled meanwhile
    before = runtime_entries()
    vm_procs = set(processes_mentioning(str(paths.runtime_dir())))
    km = AsyncKernelManager(kernel_name=spec, **km_kw)
    with pytest.raises(Exception) as info:
        await km.start_kernel(**(start_kw or {}))
    # (start errors are wrapped at 88 columns for JupyterLab's dialog: match the words)
    assert re.search(match, flat(info.value)), str(info.value)
    assert runtime_entries() == before, "a failed start must not leave a runtime dir"
    assert set(processes_mentioning(str(paths.runtime_dir()))) <= vm_procs, "VM left running"
    await km.cleanup_resources()
    return info


async def test_image_not_built_names_the_build_command(jupyter_prefix):
    spec = install_spec(jupyter_prefix, "smolvm-noimage", "--image", "not-built-yet")
    await expect_start_failure(spec, r"smol-kernel image build --name not-built-yet")


async def test_startup_timeout_shows_the_guest_console(jupyter_prefix, tmp_path):
    """A boot that takes longer than startup_timeout (a kernel that starts in a share is
    not cloned: it boots cold, which takes longer than 3 s here)."""
    spec = install_spec(jupyter_prefix, "smolvm-timeout", "--startup-timeout", "3",
                        "--share-cwd", "ro")  # fmt: skip
    info = await expect_start_failure(spec, r"did not answer within 3s",
                                      start_kw={"cwd": str(tmp_path)})  # fmt: skip
    assert "Guest console" in flat(info.value)


async def test_required_hardware_isolation_refuses_tcg(jupyter_prefix, image):
    status = QemuBackend().check(image.name)
    if status.isolation is not None and status.isolation.hardware:
        pytest.skip(f"this host gives {status.isolation}: nothing to refuse here")
    spec = install_spec(jupyter_prefix, "smolvm-hw", "--require-hardware-isolation")
    info = await expect_start_failure(spec, r"hardware isolation is required")
    assert "smol-kernel doctor" in flat(info.value)


async def test_unusable_backend_points_to_doctor(jupyter_prefix):
    spec = install_spec(jupyter_prefix, "smolvm-krun", "--backend", "libkrun")
    info = await expect_start_failure(spec, r"cannot start a Python \(smolvm-krun\) kernel")
    assert "smol-kernel doctor" in flat(info.value)


async def test_taken_port_fails_before_any_vm_boots(smolvm_spec):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        km = AsyncKernelManager(kernel_name=smolvm_spec, cache_ports=False)
        km.shell_port = port
        before = runtime_entries()
        with pytest.raises(Exception, match=rf"cannot listen for the shell channel on .*:{port}"):
            await km.start_kernel()
        assert runtime_entries() == before
        await km.cleanup_resources()
    finally:
        blocker.close()


def test_invalid_setting_is_rejected_at_install(jupyter_prefix, capsys):
    from smol_kernel.cli import main

    assert main(["install", "--prefix", str(jupyter_prefix), "--name", "bad",
                 "--backend", "warp"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert re.search(r"--backend: .*expected any of \['auto', 'qemu', 'libkrun'\]", err), err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--share", "data"], r"--share: share 'data': expected HOST:GUEST"),
        (["--share", "/tmp:/proc"], r"guest system folder"),
        (["--share-cwd", "yes"], r"--share-cwd: .*expected any of \['off', 'ro', 'rw'\]"),
        (["--dns-server", "dns.example"], r"--dns-server: 'dns.example' is not an IPv4 address"),
        (["--allow-host", "http://x"], r"--allow-host: allow_hosts entry 'http://x'"),
        (["--private-answer-range", "10.0.0.0/33"], r"--private-answer-range: '10.0.0.0/33'"),
    ],
)
def test_invalid_network_and_share_settings_are_rejected_at_install(jupyter_prefix, capsys,
                                                                    args, match):  # fmt: skip
    from smol_kernel.cli import main

    assert main(["install", "--prefix", str(jupyter_prefix), "--name", "bad", *args]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_install_names_the_launcher_tile_after_the_kernelspec(jupyter_prefix):
    """Two kernelspecs must not both read "Python (smolvm)" in JupyterLab's launcher."""
    import json

    from smol_kernel.cli import main

    for name, extra, shown in [("smolvm-tiles", [], "Python (smolvm-tiles)"),
                               ("smolvm-tiles2", ["--image", "scipy"],
                                "Python (smolvm-tiles2, image scipy)"),
                               ("smolvm-tiles3", ["--display-name", "Mine"], "Mine")]:  # fmt: skip
        assert main(["install", "--prefix", str(jupyter_prefix), "--name", name,
                     "--no-server-extension", *extra]) == 0  # fmt: skip
        spec = jupyter_prefix / "share" / "jupyter" / "kernels" / name / "kernel.json"
        assert json.loads(spec.read_text())["display_name"] == shown


async def test_missing_share_folder_fails_before_any_vm_boots(jupyter_prefix, tmp_path):
    spec = install_spec(jupyter_prefix, "smolvm-badshare", "--share", f"{tmp_path}/gone:/data")
    info = await expect_start_failure(spec, r"host folder .*/gone does not exist; create it")
    assert "cannot start a Python (smolvm-badshare) kernel" in flat(info.value)


async def test_relative_share_is_relative_to_the_notebook_folder(jupyter_prefix, tmp_path):
    spec = install_spec(jupyter_prefix, "smolvm-relshare", "--share", "data:/data")
    await expect_start_failure(spec, rf"host folder {tmp_path}/data does not exist",
                               start_kw={"cwd": str(tmp_path)})  # fmt: skip


@pytest.mark.parametrize(
    ("passt", "match"),
    [("/nonexistent/passt", r"needs passt, which is not installed; install passt: sudo apt"),
     ("/bin/false", r"network proxy exited at once")],
)  # fmt: skip
async def test_network_without_a_working_passt_fails_cleanly(jupyter_prefix, monkeypatch,
                                                            passt, match):  # fmt: skip
    spec = install_spec(jupyter_prefix, "smolvm-net-nopasst", "--network")
    monkeypatch.setenv("SMOL_KERNEL_PASST", passt)
    await expect_start_failure(spec, match)


def test_share_of_a_missing_folder_warns_at_install(jupyter_prefix, tmp_path, capsys):
    from smol_kernel.cli import main

    assert main(["install", "--prefix", str(jupyter_prefix), "--name", "later",
                 "--share", f"{tmp_path}/later:/data"]) == 0  # fmt: skip
    assert f"{tmp_path}/later does not exist yet" in capsys.readouterr().err
