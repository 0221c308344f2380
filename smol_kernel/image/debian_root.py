"""The Debian root of an image: ``mmdebstrap`` makes a minimal Debian (``suite``) with
python3 and ipykernel, our agent files and any extra packages, written as the read-only
ext4 root. Extra pip packages are resolved on the host first, so a requirement that
cannot be met fails before anything is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HostToolError
from ..guest import protocol as P
from ..trusted import find_program
from .build_steps import GUEST_FILES, SUITE_PYTHON, Build, Stage, pip_install, run_tool
from .debian import host_sources_file

BASE_PACKAGES = ("python3-minimal", "python3-ipykernel")


class DebianRoot:
    """The stages that make a Debian root; ``pip`` holds pip arguments (``-r FILE`` too)."""

    def __init__(self, suite: str, apt: list[str], pip: list[str], mmdebstrap: str) -> None:
        self.suite, self.apt, self.pip, self.mmdebstrap = suite, apt, pip, mmdebstrap
        self.python = SUITE_PYTHON[suite]

    def inputs(self) -> dict:
        return {"suite": self.suite, "apt": self.apt}

    def preflight(self) -> None:
        if not find_program(self.mmdebstrap):
            raise HostToolError(
                f"{self.mmdebstrap} is not installed; it builds the guest's Debian root. "
                "Install it with: sudo apt-get install mmdebstrap"
            )

    def stages(self, boot: list[Stage]) -> list[Stage]:
        pip = [("pip packages for the guest ({wanted})", self._pip)] if self.pip else []
        root = ("Debian root filesystem (mmdebstrap) and read-only root image (ext4)",
                self._root)  # fmt: skip
        return [*pip, boot[0], root, *boot[1:]]

    def _pip(self, b: Build) -> None:
        b.staging = b.work / "pip"
        pip_install(b, b.staging, self.python, self.pip)

    def _root(self, b: Build) -> None:
        self._mmdebstrap(b, b.out / "root.ext4")
        vfile = b.work / "versions.txt"
        for line in vfile.read_text().splitlines() if vfile.exists() else []:
            pkg, _, ver = line.partition(" ")
            b.versions[pkg] = ver

    def _mmdebstrap(self, b: Build, root_image: Path) -> None:
        guest_dir, work = P.GUEST_AGENT_DIR, b.work
        hooks = [
            f'mkdir -p "$1{guest_dir}"',
            f"copy-in {' '.join(str(f) for f in GUEST_FILES)} {guest_dir}",
        ]
        site = f"/usr/local/lib/python{self.python}/dist-packages"
        if b.staging is not None:
            hooks += [f'mkdir -p "$1{site}"', f"sync-in {b.staging} {site}"]
        compile_dirs = [guest_dir] + ([site] if b.staging is not None else [])
        hooks += [
            f'chroot "$1" python3 -m compileall -q -j0 {" ".join(compile_dirs)} >/dev/null',
            'mkdir -p "$1/root" "$1/run/smol-kernel"',
            "chroot \"$1\" dpkg-query -W -f='${Package} ${Version}\\n' "
            'python3 python3-ipykernel > "$1/tmp/versions.txt"',
            f"copy-out /tmp/versions.txt {work}",
            'rm -f "$1/tmp/versions.txt"',
            # mke2fs runs inside mmdebstrap's namespace, so files keep root ownership even in
            # unshare (non-root) mode. The copy leaves out the API filesystems mmdebstrap
            # still has mounted. Read-only root: no journal, no reserved blocks.
            f"set -e; t={work}/tree; mkdir $t; "
            'tar -C "$1" --one-file-system -cf - . | tar -C $t -xpf -; '
            "size=$(du -sm $t | cut -f1); "
            "mke2fs -q -F -t ext4 -O ^has_journal -m 0 -L smolroot "
            f'-d $t {root_image} "$((size * 5 / 4 + 96))M"; rm -rf $t',
        ]
        cmd = [
            self.mmdebstrap,
            "--variant=minbase",
            "--include=" + ",".join([*BASE_PACKAGES, *self.apt]),
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            *[f"--customize-hook={h}" for h in hooks],
            "--format=null",
            self.suite,
            "/dev/null",
        ]
        mirror = os.environ.get("SMOL_KERNEL_APT_SOURCES") or host_sources_file()
        if mirror:
            cmd.append(str(mirror))
        run_tool(b, cmd, "mmdebstrap (Debian root filesystem)")
