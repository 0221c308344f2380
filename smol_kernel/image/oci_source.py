"""The root of an image made from a container image on disk (``oci.py`` reads it): its
layers unpacked as the tree, ipykernel added with pip if its python3 has none, our agent
files, written as the read-only ext4 root.

The tree's files keep their owners: really when running as root, else in ``fakeroot``'s
records (one state file for both root steps, so the second sees the owners the first
gave), which mke2fs reads. Nothing from the tree is executed or imported on the host.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import HostToolError
from ..trusted import find_program, helper_env, python_argv
from . import oci_steps
from .build_steps import (
    GUEST_FILES,
    Build,
    ImageBuildError,
    Stage,
    compile_folder,
    disk_full_message,
    pip_install,
)
from .oci import OciError, open_image
from .oci_root import GUEST_DIR, GuestPython


class OciSource:
    """The stages that make a root from the container image at ``path``."""

    def __init__(self, path: Path, pip: list[str], fakeroot: bool) -> None:
        self.path, self.pip, self.fakeroot = path, pip, fakeroot
        with open_image(path) as image:  # OciError: what is wrong with it
            self.identity = image.identity

    def inputs(self) -> dict:
        return {"from_oci": str(self.path), "oci_image": self.identity}

    def preflight(self) -> None:
        if self.fakeroot and not find_program("fakeroot"):
            raise HostToolError(
                "image build --from-oci needs root or fakeroot (the image's files keep "
                "their owners in the guest). Install it with: sudo apt-get install fakeroot"
            )

    def stages(self, boot: list[Stage]) -> list[Stage]:
        return [
            ("container image layers, and its python3", self._unpack),
            ("pip packages for the guest ({wanted})", self._pip),
            ("read-only root image (ext4)", self._finish),
            *boot,
        ]

    def _unpack(self, b: Build) -> None:
        """The container image's layers, and what its python3 is."""
        info = self._step(b, "unpack", str(self.path), self.identity, str(b.work / "tree"))
        b.python = python = GuestPython(**info["python"])
        versions = b.versions
        versions["oci_image"] = f"{self.identity} ({info['kind']}, {info['layers']} layers)"
        if info["skipped"]:
            versions["oci_skipped"] = ", ".join(f"{n} {k}" for k, n in info["skipped"].items())
        versions["python"] = f"{python.version} ({python.executable})"
        versions["ipykernel"] = "from the image" if python.ipykernel else "added with pip"
        versions["owners"] = "fakeroot" if self.fakeroot else "root"
        if not python.ipykernel:
            b.wanted = ["ipykernel", *b.wanted]

    def _pip(self, b: Build) -> None:
        """pip packages for the image's python (ipykernel if it has none), and our agent."""
        python = b.python
        assert python is not None
        same_python = f"{sys.version_info[0]}.{sys.version_info[1]}" == python.version
        if b.wanted:
            if python.musl:
                raise OciError(
                    "the image uses musl libc (Alpine), where pip's manylinux wheels do not run;"
                    " install ipykernel and your packages in the image itself (e.g. apk add "
                    "py3-ipykernel, or pip install in the image)"
                )
            extra = [] if python.ipykernel else ["ipykernel"]
            pip_install(b, b.work / "pip", python.version, [*extra, *self.pip])
            if same_python:
                compile_folder(b.work / "pip", python.site)
            b.staging = b.work / "pip"
        guest = b.work / "guest"
        guest.mkdir()
        for f in GUEST_FILES:
            shutil.copy2(f, guest / f.name)
        if same_python:  # else the guest compiles them in memory at each start
            compile_folder(guest, "/" + GUEST_DIR)

    def _finish(self, b: Build) -> None:
        """The tree with our pieces, as the read-only ext4 root."""
        assert b.python is not None
        python_json = json.dumps(dataclasses.asdict(b.python))
        staging = str(b.staging) if b.staging else ""
        self._step(b, "finish", str(b.work / "tree"), python_json, staging,
                   str(b.work / "guest"), str(b.out / "root.ext4"))  # fmt: skip
        shutil.rmtree(b.work / "tree")

    def _step(self, b: Build, step: str, *args: str) -> dict:
        """Run one of ``oci_steps`` as root: here if we are, else under fakeroot."""
        if not self.fakeroot:
            try:
                return oci_steps.STEPS[step](*args)
            except oci_steps.StepError as e:
                if "No space left" in str(e):
                    raise ImageBuildError(disk_full_message(b.work.parent)) from e
                raise ImageBuildError(str(e)) from e
        state = b.work / "fakeroot.state"
        fakeroot = ["fakeroot", "-s", str(state)] + (["-i", str(state)] if state.exists() else [])
        argv = [*fakeroot, "--", *python_argv("smol_kernel.image.oci_steps", step, *args)]
        proc = subprocess.run(argv, capture_output=True, text=True, env=helper_env(), cwd=b.work)
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise ImageBuildError(
                f"the {step} step under fakeroot failed (exit {proc.returncode}):\n"
                + (proc.stderr or proc.stdout).strip()[-2000:]
            ) from None
        if "error" in result:
            if result.get("enospc"):
                raise ImageBuildError(disk_full_message(b.work.parent))
            raise (OciError if result.get("oci") else ImageBuildError)(result["error"])
        return result
