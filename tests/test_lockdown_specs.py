"""Which kernelspec a locked-down server takes for an allowed name (no server, no VM): only
an administrator's copy that names the smolvm provisioner. The server itself, attacked
over its REST API, is tests/security/test_lockdown.py."""

from __future__ import annotations

import json
import os
import sys

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from smol_kernel.kernelspec import template

from smol_kernel.lockdown import KernelspecNotAllowed, LockedKernelSpecManager

HOST_SPEC = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
             "display_name": "host python", "language": "python"}  # fmt: skip


def _spec(kernels, name, spec) -> None:
    (kernels / name).mkdir(parents=True)
    (kernels / name / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """The user's own data folder first (as Jupyter searches it), then an admin's."""
    user, admin = tmp_path / "user-data", tmp_path / "admin"
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(user))
    _spec(user / "kernels", "smolvm", HOST_SPEC)
    _spec(admin / "kernels", "smolvm", template())
    _spec(admin / "kernels", "hostpy", HOST_SPEC)
    return [str(user / "kernels"), str(admin / "kernels")], user, admin


def test_the_users_own_copy_never_shadows_the_admins(dirs):
    kernel_dirs, user, admin = dirs
    plain = KernelSpecManager(kernel_dirs=kernel_dirs)
    assert plain.find_kernel_specs()["smolvm"] == str(user / "kernels" / "smolvm"), "control"
    locked = LockedKernelSpecManager(kernel_dirs=kernel_dirs, allowed_kernelspecs={"smolvm"})
    assert locked.find_kernel_specs() == {"smolvm": str(admin / "kernels" / "smolvm")}
    assert locked.get_kernel_spec("smolvm").resource_dir == str(admin / "kernels" / "smolvm")


def test_an_allowed_kernelspec_must_name_the_smolvm_provisioner(dirs):
    kernel_dirs, _, _ = dirs
    locked = LockedKernelSpecManager(kernel_dirs=kernel_dirs,
                                     allowed_kernelspecs={"smolvm", "hostpy"})  # fmt: skip
    assert set(locked.find_kernel_specs()) == {"smolvm"}
    with pytest.raises(KernelspecNotAllowed, match="does not name the smolvm provisioner"):
        locked.get_kernel_spec("hostpy")


@pytest.mark.skipif(os.getuid() != 0, reason="making another user's folder needs root")
@pytest.mark.parametrize("how", ["other-owner", "group-writable", "symlink", "parent-writable",
                                 "parent-of-other-owner"])  # fmt: skip
def test_a_kernelspec_others_can_change_is_not_taken(dirs, tmp_path, how):
    """Review of issue 36 (the parents): an admin's folder under one another user can write
    could be renamed away between the check and the read, and another put in its place."""
    kernel_dirs, _, admin = dirs
    spec = admin / "kernels" / "smolvm"
    if how == "other-owner":
        os.chown(spec, 4242, 4242)
    elif how == "group-writable":
        (spec / "kernel.json").chmod(0o664)
    elif how == "parent-writable":
        admin.chmod(0o777)
    elif how == "parent-of-other-owner":
        os.chown(admin, 4242, 4242)
    else:
        real = tmp_path / "elsewhere.json"
        (spec / "kernel.json").rename(real)
        (spec / "kernel.json").symlink_to(real)
    locked = LockedKernelSpecManager(kernel_dirs=kernel_dirs, allowed_kernelspecs={"smolvm"})
    assert locked.find_kernel_specs() == {}
    with pytest.raises(KernelspecNotAllowed, match="no administrator's copy"):
        locked.get_kernel_spec("smolvm")
    sticky = tmp_path / "sticky"  # control: a sticky folder (like /tmp) above is fine
    _spec(sticky / "kernels", "smolvm", template())
    sticky.chmod(0o1777)
    again = LockedKernelSpecManager(kernel_dirs=[str(sticky / "kernels")],
                                    allowed_kernelspecs={"smolvm"})  # fmt: skip
    assert again.get_kernel_spec("smolvm").resource_dir == str(sticky / "kernels" / "smolvm")
