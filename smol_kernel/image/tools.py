"""Helper binaries the host needs but the host's Debian release lacks.

``vhost-device-vsock`` (the user-space vsock device QEMU talks to) is packaged in Debian sid
only; its binary runs on bookworm. We download that package with a private apt lists dir and
unpack it into ``<cache>/tools`` -- the system's packages are never upgraded.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .. import paths
from ..trusted import find_program
from .debian import Apt, HostToolError, unpack_deb

VHOST_VSOCK = "vhost-device-vsock"


def find_vhost_device_vsock() -> Path | None:
    local = paths.tools_dir() / "bin" / VHOST_VSOCK
    if local.exists():
        return local
    found = find_program(VHOST_VSOCK)
    return Path(found) if found else None


def install_vhost_device_vsock(log=print) -> Path:
    """Make sure vhost-device-vsock is available; return its path."""
    existing = find_vhost_device_vsock()
    if existing:
        return existing
    tools = paths.tools_dir()
    tools.mkdir(parents=True, exist_ok=True)
    log(f"fetching {VHOST_VSOCK} from Debian sid into {tools}")
    apt = Apt(state_dir=tools / "apt-sid", suite="sid")
    apt.update()
    with tempfile.TemporaryDirectory(dir=tools) as tmp:
        deb = apt.download(VHOST_VSOCK, Path(tmp))
        unpack_deb(deb, Path(tmp) / "x")
        binary = Path(tmp) / "x" / "usr" / "bin" / VHOST_VSOCK
        if not binary.exists():
            raise HostToolError(f"{deb.name} has no usr/bin/{VHOST_VSOCK}")
        (tools / "bin").mkdir(exist_ok=True)
        dest = tools / "bin" / VHOST_VSOCK
        shutil.copy2(binary, dest.with_suffix(".new"))
        dest.with_suffix(".new").rename(dest)
    shutil.rmtree(tools / "apt-sid", ignore_errors=True)
    return dest
