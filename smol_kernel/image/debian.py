"""Small helpers around the host's apt: find its Debian mirror, download and unpack .debs.

Nothing here installs or upgrades a package on the host: packages are downloaded with
``apt-get download`` and unpacked with ``dpkg-deb -x`` into directories we own.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from ..errors import HostToolError
from ..trusted import find_program

APT_SOURCES = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))


def require_tool(name: str, package: str) -> str:
    path = find_program(name)
    if not path:
        raise HostToolError(
            f"{name} is not installed. Install it with: sudo apt-get install {package}"
        )
    return path


def _source_files() -> list[Path]:
    files: list[Path] = []
    for src in APT_SOURCES:
        if src.is_dir():
            files += sorted(src.glob("*.sources")) + sorted(src.glob("*.list"))
        elif src.is_file():
            files.append(src)
    return files


def _mirror_in(f: Path) -> str | None:
    try:
        text = f.read_text()
    except OSError:
        return None
    if f.suffix == ".sources":
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            enabled = re.search(r"^Enabled:\s*no", stanza, re.M | re.I)
            if uris and suites and not enabled and "security" not in suites.group(1):
                return uris.group(1)
    else:
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and "security" not in m.group(2):
                return m.group(1)
    return None


def host_debian_mirror() -> str | None:
    """The main Debian archive URI the host's apt is configured with, if any."""
    for f in _source_files():
        if mirror := _mirror_in(f):
            return mirror
    return None


def host_sources_file() -> Path | None:
    """The host's apt sources file, usable as mmdebstrap's mirror argument."""
    for f in _source_files():
        if _mirror_in(f):
            return f
    return None


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("E:")]
        detail = "\n".join(errors) or (proc.stderr or proc.stdout).strip()[-2000:]
        raise HostToolError(f"{' '.join(cmd[:3])} failed:\n{detail}")
    return proc.stdout


class Apt:
    """apt-get/apt-cache, optionally with a private lists dir (e.g. for Debian sid)."""

    def __init__(self, state_dir: Path | None = None, suite: str | None = None) -> None:
        require_tool("apt-get", "apt")
        self.opts: list[str] = []
        if state_dir is not None:
            mirror = host_debian_mirror()
            if not mirror:
                raise HostToolError(
                    "cannot find a Debian mirror in the host's apt sources; "
                    "smol-kernel needs a Debian or Ubuntu host with apt configured"
                )
            (state_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
            (state_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
            sources = state_dir / "sources.list"
            keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
            sources.write_text(f"deb [signed-by={keyring}] {mirror} {suite} main\n")
            self.opts = [
                "-o", f"Dir::Etc::SourceList={sources}",
                "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={state_dir / 'lists'}",
                "-o", f"Dir::Cache={state_dir / 'cache'}",
                "-o", "APT::Get::List-Cleanup=0",
            ]  # fmt: skip

    def update(self) -> None:
        _run(["apt-get", *self.opts, "update"])

    def resolve(self, package: str) -> str:
        """Follow a metapackage (e.g. linux-image-amd64) to the versioned package it names."""
        out = _run(["apt-cache", *self.opts, "depends", package])
        for line in out.splitlines():
            m = re.match(r"\s+Depends:\s+(linux-image-\S+)", line)
            if m:
                return m.group(1)
        return package

    def download(self, package: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        # apt drops privileges to _apt for downloads; it cannot write to a root-owned dir.
        env = dict(os.environ)
        _run(
            ["apt-get", *self.opts, "-o", "APT::Sandbox::User=root", "download", package],
            cwd=dest,
            env=env,
        )
        new = sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob(f"{package}_*.deb"))
        if not new:
            raise HostToolError(f"apt-get download {package} produced no .deb")
        return new[-1]


def unpack_deb(deb: Path, dest: Path) -> None:
    require_tool("dpkg-deb", "dpkg")
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
