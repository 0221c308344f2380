"""Build a guest image: Debian root (mmdebstrap) + kernel + tiny initramfs + our agent.
With ``from_oci`` the root comes from a container image on disk instead (``oci.py``).

The build happens in a temporary directory next to the destination and is renamed into
place only when complete, so a failed or interrupted build never leaves a half image (and
never leaks its temp dir). An image is rebuilt only when its inputs change.
"""

from __future__ import annotations

import bz2
import dataclasses
import errno
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .. import __version__, paths
from ..errors import HostToolError
from ..guest import agent as _agent_mod
from ..guest import protocol as P
from ..trusted import find_program, helper_env, python_argv
from . import oci_steps
from .debian import Apt, host_sources_file, require_tool, unpack_deb
from .initramfs import GUEST_MODULES, OPTIONAL_MODULES, build_initramfs, resolve_modules
from .oci import OciError, open_image
from .oci_root import GUEST_DIR, GuestPython
from .progress import StageProgress
from .store import DEFAULT_IMAGE, GuestImage, check_name, file_sha256

BUILDER_VERSION = 1
# Host package files copied into the guest's GUEST_AGENT_DIR (their hashes are inputs).
GUEST_FILES = tuple(
    Path(_agent_mod.__file__).with_name(name)
    for name in ("agent.py", "protocol.py", "mux.py", "kernel_launcher.py", "sandbox_ops.py")
)
SUITE_PYTHON = {"bookworm": "3.11", "trixie": "3.13"}
BASE_PACKAGES = ("python3-minimal", "python3-ipykernel")
MIN_FREE_BYTES = 2 << 30
PIP_PLATFORMS = (
    "manylinux_2_36_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64",
    "manylinux1_x86_64", "linux_x86_64",
)  # fmt: skip


@dataclass
class _Build:
    """What one build's stages hand on to the next."""

    work: Path
    out: Path  # the image folder being made
    versions: dict[str, str] = field(default_factory=dict)
    wanted: list[str] = field(default_factory=list)  # pip packages (and -r FILE) for the guest
    staging: Path | None = None  # pip's install target, copied into the root
    release: str = ""  # the guest kernel's release
    python: GuestPython | None = None  # an OCI image's python3

    @property
    def kernel_dir(self) -> Path:
        return self.work / "kernel"

    @property
    def busybox_dir(self) -> Path:
        return self.work / "busybox"


class ImageBuildError(Exception):
    """The image could not be built; the message says why and what to do."""


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Decompress the ELF kernel inside a bzImage, for direct (PVH) boot."""
    data = bzimage.read_bytes()
    for magic, decompress in (
        (b"\xfd7zXZ\x00", lambda d: lzma.LZMADecompressor().decompress(d)),
        (b"\x1f\x8b\x08", lambda d: gzip.GzipFile(fileobj=__import__("io").BytesIO(d)).read()),
        (b"BZh", lambda d: bz2.BZ2Decompressor().decompress(d)),
    ):
        start = data.find(magic)
        while start != -1:
            try:
                elf = decompress(data[start:])
            except (lzma.LZMAError, OSError, EOFError, ValueError):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                out.write_bytes(elf)
                return
            start = data.find(magic, start + 1)
    raise ImageBuildError(
        f"cannot find an xz/gzip/bzip2-compressed ELF kernel in {bzimage.name}; "
        "use a Debian linux-image package for amd64"
    )


# What a data notebook expects, from Debian (tested together, no compiler needed).
PRESETS = {
    "scipy": ("python3-numpy", "python3-pandas", "python3-matplotlib", "python3-scipy",
              "python3-sympy", "python3-openpyxl"),
}  # fmt: skip


class ImageBuilder:
    """Builds one named guest image.

    ``apt`` and ``pip`` are extra packages for the guest, ``requirements`` a pip
    requirements file; ``preset`` adds a named set of Debian packages (``PRESETS``). pip
    packages are resolved on the host (so the host's pip configuration applies; the network
    is used at build time only) as wheels for the guest's Python and copied into
    ``/usr/local/lib/python3.X/dist-packages``.

    ``from_oci``: the root is that container image's (``oci.py``), with our agent added and
    ipykernel too if it has none; ``apt``, ``preset`` and ``suite`` do not apply. Its files
    get their owners really when ``fakeroot`` is false (needs root), else in fakeroot's
    records, which mke2fs reads (default: fakeroot unless running as root).
    """

    def __init__(
        self,
        name: str = DEFAULT_IMAGE,
        apt: list[str] | tuple[str, ...] = (),
        pip: list[str] | tuple[str, ...] = (),
        suite: str = "bookworm",
        kernel_package: str = "linux-image-amd64",
        images_root: Path | None = None,
        mmdebstrap: str = "mmdebstrap",
        progress: StageProgress | None = None,
        requirements: Path | None = None,
        preset: str | None = None,
        from_oci: Path | None = None,
        fakeroot: bool | None = None,
    ) -> None:
        self.name = check_name(name)
        self.from_oci = Path(from_oci).absolute() if from_oci else None
        # how --from-oci gives files their owners: really (root), or in fakeroot's records
        self.fakeroot = os.geteuid() != 0 if fakeroot is None else fakeroot
        self._oci_identity = ""
        if self.from_oci is not None:
            if apt or preset or suite != "bookworm":
                raise ValueError(
                    "--apt, --preset and --suite build a Debian root; with --from-oci the root "
                    "is the container image's: install packages in the image, or add pip "
                    "packages with --pip or --requirements"
                )
            with open_image(self.from_oci) as image:  # OciError: what is wrong with it
                self._oci_identity = image.identity
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        self.preset = preset
        self.apt = sorted(set(apt) | set(PRESETS.get(preset or "", ())))
        self.pip = sorted(set(pip))
        self.requirements = Path(requirements) if requirements else None
        self._requirements_text = ""
        if self.requirements is not None:
            try:
                self._requirements_text = self.requirements.read_text()
            except OSError as e:
                raise ValueError(f"cannot read the requirements file: {e}") from None
        if suite not in SUITE_PYTHON:
            raise ValueError(f"unsupported suite {suite!r}; choose from {sorted(SUITE_PYTHON)}")
        self.suite = suite
        self.kernel_package = kernel_package
        self.images_root = images_root or paths.images_dir()
        self.mmdebstrap = mmdebstrap
        self.progress = progress
        for pkg in self.apt:
            if not pkg or pkg.startswith("-") or any(c.isspace() for c in pkg):
                raise ValueError(f"invalid apt package name {pkg!r}")
        for pkg in self.pip:
            if not pkg or pkg.startswith("-"):
                raise ValueError(f"invalid pip requirement {pkg!r}")

    # ---------------------------------------------------------------- inputs
    def inputs(self) -> dict:
        guest_files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in GUEST_FILES}
        guest_files["init.sh"] = hashlib.sha256(self._init_script()).hexdigest()
        root = {"suite": self.suite, "apt": self.apt}
        if self.from_oci is not None:
            root = {"from_oci": str(self.from_oci), "oci_image": self._oci_identity}
        return {
            "builder_version": BUILDER_VERSION,
            **root,
            "pip": self.pip,
            "requirements": self._requirements_text,
            "kernel_package": self.kernel_package,
            "modules": list(GUEST_MODULES),
            "optional_modules": OPTIONAL_MODULES,
            "guest_files": guest_files,
        }

    def input_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.inputs(), sort_keys=True).encode()).hexdigest()

    @property
    def dest(self) -> Path:
        return self.images_root / self.name

    def current(self) -> GuestImage | None:
        """The existing image if it was built from the same inputs."""
        try:
            image = GuestImage.load(self.name, self.images_root)
        except Exception:
            return None
        return image if image.manifest.get("input_hash") == self.input_hash() else None

    @staticmethod
    def _init_script() -> bytes:
        script = resources.files("smol_kernel.image").joinpath("init.sh").read_bytes()
        return script.replace(b"@GUEST_AGENT_DIR@", P.GUEST_AGENT_DIR.encode())

    # ---------------------------------------------------------------- build
    def build(self, force: bool = False) -> GuestImage:
        if not force and (image := self.current()):
            if self.progress:
                self.progress.done(f"image {self.name!r} is up to date at {image.path}")
            return image
        self._preflight()
        self.images_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".build-{self.name}-", dir=self.images_root))
        t0 = time.monotonic()
        try:
            image = self._build_in(work, t0)
        except OSError as e:
            if self.progress:
                self.progress.fail()
            if e.errno == errno.ENOSPC:
                raise ImageBuildError(self._disk_full_message()) from e
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ImageBuildError(
                    f"no permission to write the image ({e}). Make {self.images_root} "
                    "writable or set SMOL_KERNEL_CACHE_DIR to a writable directory."
                ) from e
            raise
        except BaseException:
            if self.progress:
                self.progress.fail()
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return image

    def _disk_full_message(self) -> str:
        free = shutil.disk_usage(self.images_root).free if self.images_root.exists() else 0
        return (
            f"disk full: {free >> 20} MiB free under {self.images_root}, a guest image needs "
            f"about {MIN_FREE_BYTES >> 20} MiB while building. Free some space or set "
            "SMOL_KERNEL_CACHE_DIR to a larger disk."
        )

    def stage_count(self) -> int:
        return len(self.pipeline())

    def pipeline(self) -> list[tuple[str, Callable[[_Build], None]]]:
        """The stages of this build, in order: one pipeline per source of the root (a
        title may name what a stage before it found: ``{wanted}``)."""
        boot = [
            (f"download kernel ({self.kernel_package}) and busybox", self._download_kernel),
            ("kernel for direct boot (vmlinux)", self._vmlinux),
            ("initramfs", self._initramfs),
        ]
        if self.from_oci is not None:
            return [
                ("container image layers, and its python3", self._oci_unpack),
                ("pip packages for the guest ({wanted})", self._oci_pip),
                ("read-only root image (ext4)", self._oci_finish),
                *boot,
            ]
        # pip first: a requirement that cannot be met fails before anything is downloaded
        pip = [("pip packages for the guest ({wanted})", self._debian_pip)]
        return [
            *(pip if self.pip or self.requirements else []),
            boot[0],
            ("Debian root filesystem (mmdebstrap) and read-only root image (ext4)",
             self._debian_root),
            *boot[1:],
        ]  # fmt: skip

    def _preflight(self) -> None:
        if self.from_oci is not None:
            if self.fakeroot and not find_program("fakeroot"):
                raise HostToolError(
                    "image build --from-oci needs root or fakeroot (the image's files keep "
                    "their owners in the guest). Install it with: sudo apt-get install fakeroot"
                )
        elif not find_program(self.mmdebstrap):
            raise HostToolError(
                f"{self.mmdebstrap} is not installed; it builds the guest's Debian root. "
                "Install it with: sudo apt-get install mmdebstrap"
            )
        require_tool("mke2fs", "e2fsprogs")
        require_tool("dpkg-deb", "dpkg")
        # Find the nearest existing ancestor to check permissions and free space.
        probe = self.images_root
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise ImageBuildError(
                f"no permission to write under {probe}. Make it writable or set "
                "SMOL_KERNEL_CACHE_DIR to a writable directory."
            )
        if shutil.disk_usage(probe).free < MIN_FREE_BYTES:
            raise ImageBuildError(self._disk_full_message())

    def _stage(self, title: str) -> None:
        if self.progress:
            self.progress.stage(title)

    def _build_in(self, work: Path, t0: float) -> GuestImage:
        b = _Build(work, work / "image")
        b.out.mkdir()
        b.wanted = self.pip + ([f"-r {self.requirements}"] if self.requirements else [])
        for title, step in self.pipeline():
            self._stage(title.format(wanted=", ".join(b.wanted) or "none"))
            step(b)
        out, versions = b.out, b.versions

        manifest = {
            "name": self.name,
            "smol_kernel_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0, 1),
            "inputs": self.inputs(),
            "input_hash": self.input_hash(),
            "versions": versions,
            "files": {
                f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
                for f in sorted(out.iterdir())
            },
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        # Swap into place: the old image (if any) stays usable until the rename.
        old = None
        if self.dest.exists():
            old = self.dest.with_name(f".old-{self.name}-{os.getpid()}")
            self.dest.rename(old)
        out.rename(self.dest)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        image = GuestImage.load(self.name, self.images_root)
        if self.progress:
            self.progress.done(f"built image {self.name!r} at {image.path}")
        return image

    # ---------------------------------------------------------------- stages
    def _debian_pip(self, b: _Build) -> None:
        b.staging = b.work / "pip"
        self._pip_install(b.staging)

    def _download_kernel(self, b: _Build) -> None:
        apt = Apt()
        kernel_pkg = apt.resolve(self.kernel_package)
        unpack_deb(apt.download(kernel_pkg, b.work / "debs"), b.kernel_dir)
        unpack_deb(apt.download("busybox-static", b.work / "debs"), b.busybox_dir)
        releases = sorted((b.kernel_dir / "lib" / "modules").iterdir())
        if not releases:
            raise ImageBuildError(f"{kernel_pkg} contains no kernel modules")
        b.release = releases[-1].name
        b.versions["kernel_package"] = kernel_pkg
        b.versions["kernel_release"] = b.release

    def _debian_root(self, b: _Build) -> None:
        self._mmdebstrap(b.out / "root.ext4", b.work, b.staging)
        vfile = b.work / "versions.txt"
        for line in vfile.read_text().splitlines() if vfile.exists() else []:
            pkg, _, ver = line.partition(" ")
            b.versions[pkg] = ver

    def _vmlinux(self, b: _Build) -> None:
        bzimage = next((b.kernel_dir / "boot").glob("vmlinuz-*"))
        extract_vmlinux(bzimage, b.out / "vmlinux")

    def _initramfs(self, b: _Build) -> None:
        mdir = b.kernel_dir / "lib" / "modules" / b.release
        modules = resolve_modules(mdir, GUEST_MODULES)
        optional = {  # each group's modules and deps, minus those always loaded
            group: [ko for ko in resolve_modules(mdir, names) if ko not in modules]
            for group, names in OPTIONAL_MODULES.items()
        }
        build_initramfs(
            b.busybox_dir / "bin" / "busybox", self._init_script(), modules,
            b.out / "initramfs.cpio", optional,
        )  # fmt: skip

    def _run(self, cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
        if proc.returncode != 0:
            text = proc.stderr + proc.stdout
            if "No space left on device" in text:
                raise ImageBuildError(self._disk_full_message())
            lines = text.strip().splitlines()
            errors = [ln for ln in lines if ln.startswith(("E:", "ERROR:"))]
            # apt's own "E:" lines say what is wrong (e.g. an unknown package); the lines
            # just before mmdebstrap's first "E:" show a failing hook's own message.
            first = next((i for i, ln in enumerate(lines) if ln.startswith("E:")), len(lines))
            context = [ln for ln in lines[max(0, first - 5) : first] if not ln.startswith("I:")]
            detail = "\n".join(context + errors) if errors else "\n".join(lines[-30:])
            raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n{detail}")
        return proc

    def _pip_install(self, staging: Path, pyver: str = "", extra: tuple[str, ...] = ()) -> None:
        pyver = pyver or SUITE_PYTHON[self.suite]
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
            "--target", str(staging), "--only-binary=:all:", "--implementation", "cp",
            "--python-version", pyver,
        ]  # fmt: skip
        for plat in PIP_PLATFORMS:
            cmd += ["--platform", plat]
        try:
            reqs = ["-r", str(self.requirements)] if self.requirements else []
            self._run([*cmd, *self.pip, *extra, *reqs], "pip install (for the guest)")
        except ImageBuildError as e:
            raise ImageBuildError(
                f"{e}\n(guest pip packages must be available as wheels for CPython {pyver} "
                "on x86_64 Linux)"
            ) from None
        shutil.rmtree(staging / "bin", ignore_errors=True)

    def _mmdebstrap(self, root_image: Path, work: Path, pip_staging: Path | None) -> None:
        pyver = SUITE_PYTHON[self.suite]
        guest_dir = P.GUEST_AGENT_DIR
        hooks = [
            f'mkdir -p "$1{guest_dir}"',
            f"copy-in {' '.join(str(f) for f in GUEST_FILES)} {guest_dir}",
        ]
        site = f"/usr/local/lib/python{pyver}/dist-packages"
        if pip_staging is not None:
            hooks += [f'mkdir -p "$1{site}"', f"sync-in {pip_staging} {site}"]
        compile_dirs = [guest_dir] + ([site] if pip_staging is not None else [])
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
        self._run(cmd, "mmdebstrap (Debian root filesystem)")

    # ---------------------------------------------------------------- from an OCI image
    def _oci_unpack(self, b: _Build) -> None:
        """The container image's layers, and what its python3 is."""
        info = self._oci_step(b.work, "unpack", str(self.from_oci), self._oci_identity,
                              str(b.work / "tree"))  # fmt: skip
        b.python = python = GuestPython(**info["python"])
        versions = b.versions
        versions["oci_image"] = f"{self._oci_identity} ({info['kind']}, {info['layers']} layers)"
        if info["skipped"]:
            versions["oci_skipped"] = ", ".join(f"{n} {k}" for k, n in info["skipped"].items())
        versions["python"] = f"{python.version} ({python.executable})"
        versions["ipykernel"] = "from the image" if python.ipykernel else "added with pip"
        versions["owners"] = "fakeroot" if self.fakeroot else "root"
        if not python.ipykernel:
            b.wanted = [*self.pip, "ipykernel", *b.wanted[len(self.pip) :]]

    def _oci_pip(self, b: _Build) -> None:
        """pip packages for the image's python (ipykernel if it has none), and our agent."""
        python = b.python
        assert python is not None
        extra = () if python.ipykernel else ("ipykernel",)
        same_python = f"{sys.version_info[0]}.{sys.version_info[1]}" == python.version
        if b.wanted:
            if python.musl:
                raise OciError(
                    "the image uses musl libc (Alpine), where pip's manylinux wheels do not run;"
                    " install ipykernel and your packages in the image itself (e.g. apk add "
                    "py3-ipykernel, or pip install in the image)"
                )
            self._pip_install(b.work / "pip", python.version, extra)
            if same_python:
                self._compile(b.work / "pip", python.site)
            b.staging = b.work / "pip"
        guest = b.work / "guest"
        guest.mkdir()
        for f in GUEST_FILES:
            shutil.copy2(f, guest / f.name)
        if same_python:  # else the guest compiles them in memory at each start
            self._compile(guest, "/" + GUEST_DIR)

    def _oci_finish(self, b: _Build) -> None:
        """The tree with our pieces, as the read-only ext4 root."""
        assert b.python is not None
        python_json = json.dumps(dataclasses.asdict(b.python))
        staging = str(b.staging) if b.staging else ""
        self._oci_step(b.work, "finish", str(b.work / "tree"), python_json, staging,
                       str(b.work / "guest"), str(b.out / "root.ext4"))  # fmt: skip
        shutil.rmtree(b.work / "tree")

    def _oci_step(self, work: Path, step: str, *args: str) -> dict:
        """Run one of ``oci_steps`` as root: here if we are, else under fakeroot (one state
        file for both steps, so the second sees the owners the first gave)."""
        if not self.fakeroot:
            try:
                return oci_steps.STEPS[step](*args)
            except oci_steps.StepError as e:
                if "No space left" in str(e):
                    raise ImageBuildError(self._disk_full_message()) from e
                raise ImageBuildError(str(e)) from e
        state = work / "fakeroot.state"
        fakeroot = ["fakeroot", "-s", str(state)] + (["-i", str(state)] if state.exists() else [])
        argv = [*fakeroot, "--", *python_argv("smol_kernel.image.oci_steps", step, *args)]
        proc = subprocess.run(argv, capture_output=True, text=True, env=helper_env(), cwd=work)
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise ImageBuildError(
                f"the {step} step under fakeroot failed (exit {proc.returncode}):\n"
                + (proc.stderr or proc.stdout).strip()[-2000:]
            ) from None
        if "error" in result:
            if result.get("enospc"):
                raise ImageBuildError(self._disk_full_message())
            raise (OciError if result.get("oci") else ImageBuildError)(result["error"])
        return result

    def _compile(self, folder: Path, guest_path: str) -> None:
        import compileall

        if not compileall.compile_dir(folder, quiet=2, ddir=guest_path, workers=0):
            raise ImageBuildError(f"compiling the Python files for {guest_path} failed")
