"""Installs for a kernel with no network, served by the host.

``HostInstaller`` belongs to one kernel. For each request it:

* parses the guest's requirements strictly (``requirements.py``);
* resolves them with uv against the server's index, for the guest's Python and platform,
  **binary wheels only** (``--only-binary :all:``: no sdist is ever built, so no package
  code runs on the host), and writes a lock with every wheel's hash;
* installs the lock with ``--require-hashes`` into a folder of its own (a wheel is unpacked,
  never run), and measures it;
* hands back that tree, for the caller to send into the VM, and one audit line.

Caps, per kernel: the installed size in all (``max_install_mib``), installs a minute
(``max_installs_per_minute``), requirements per install (``max_packages_per_install``).
uv runs without the host's uv or pip configuration; only the index is the server's.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..error_root import SmolKernelError
from ..shown import printable
from .requirements import check_names, parse_requirements

UV_TIMEOUT = 180.0  # seconds a resolve or an install may take
WATCH_INTERVAL = 0.25  # seconds between two looks at what uv wrote
WORK_SLACK = 64 << 20  # bytes uv may write beyond twice the remaining size (its metadata)
MAX_INSTALLS_AT_ONCE = 2
GUEST_PLATFORM = "x86_64-manylinux_2_36"  # the guest images' glibc (bookworm: 2.36)
_PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


class InstallError(SmolKernelError, RuntimeError):
    """An install the host could not or would not do; the message says why."""


@dataclass(frozen=True)
class PackagePolicy:
    """The server's package settings for one kernel."""

    index_url: str
    max_install_mib: int = 512
    max_installs_per_minute: int = 6
    max_packages_per_install: int = 20
    allow: tuple[str, ...] = ()
    block: tuple[str, ...] = ()


@dataclass
class Installed:
    """One install: what it brought (name, version), its size, and the tree to hand over."""

    packages: list[tuple[str, str]]
    size_bytes: int
    tree: Path
    work: Path = field(repr=False)

    def archive(self) -> Path:
        """The tree as a gzipped tar file next to it (regular files and folders only, names
        relative, owned by root): blocking, run it in a thread."""
        path = self.work / "tree.tar.gz"
        with tarfile.open(path, mode="w:gz", compresslevel=1) as tar:
            for member in sorted(self.tree.rglob("*")):
                if member.is_symlink() or not (member.is_file() or member.is_dir()):
                    continue
                if member.name == ".lock" and member.parent == self.tree:
                    continue
                tar.add(member, arcname=str(member.relative_to(self.tree)), recursive=False,
                        filter=_anonymous)  # fmt: skip
        return path

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def describe(self) -> str:
        names = ", ".join(f"{n}=={v}" for n, v in self.packages)
        return f"installed {names} ({self.size_bytes / (1 << 20):.1f} MiB)"


@dataclass(frozen=True)
class InstallReport:
    """What an install brought into a kernel, as its caller shows it."""

    packages: list[tuple[str, str]]  # (name, version), dependencies included
    size_bytes: int
    guest_folder: str  # where the kernel imports them from
    seconds: float

    @property
    def text(self) -> str:
        names = ", ".join(f"{n}=={v}" for n, v in self.packages)
        return (f"installed {names} ({self.size_bytes / (1 << 20):.1f} MiB) into "
                f"{self.guest_folder} in {self.seconds:.1f}s")  # fmt: skip


def guest_python_version(versions: dict) -> str:
    """The guest's Python as major.minor, from an image's recorded versions."""
    for key in ("python3", "python"):
        if m := re.match(r"(\d+)\.(\d+)", str(versions.get(key, ""))):
            return f"{m.group(1)}.{m.group(2)}"
    return "3.11"


def default_index_url() -> str:
    """What the host's pip uses: PIP_INDEX_URL, else pip's configured index, else PyPI."""
    if url := os.environ.get("PIP_INDEX_URL"):
        return url
    try:
        # -I, from /: pip of this interpreter, importing nothing from a working folder a
        # guest may write (a share) or from PYTHON* variables.
        out = subprocess.run([sys.executable, "-I", "-m", "pip", "config", "get",
                              "global.index-url"], capture_output=True, text=True, timeout=20,
                             cwd="/")  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "https://pypi.org/simple"


def find_uv() -> str:
    """The uv of the ``uv`` package (never one found on PATH: a shim may pick what to run
    from the working folder)."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        raise InstallError("uv is not installed on the host: pip install uv") from None


_running: asyncio.Semaphore | None = None  # installs at once, server-wide (see running())


def running() -> asyncio.Semaphore:
    """Installs the whole server runs at once: each is a uv with its downloads."""
    global _running
    if _running is None:
        _running = asyncio.Semaphore(MAX_INSTALLS_AT_ONCE)
    return _running


class HostInstaller:
    """One kernel's installs (see the module docstring)."""

    def __init__(self, policy: PackagePolicy, python_version: str = "3.11") -> None:
        self.policy = policy
        self.python_version = python_version
        self.used_bytes = 0  # in the kernel's current VM (``new_vm`` starts it again)
        self._recent: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    def new_vm(self) -> None:
        """The kernel has a fresh VM without the packages: the size counts from zero (the
        rate limit does not: a restart must not reset it)."""
        self.used_bytes = 0

    def refund(self, installed: Installed) -> None:
        """An install that did not reach the VM does not count against its size."""
        self.used_bytes = max(0, self.used_bytes - installed.size_bytes)

    async def install(self, requirements: list[str]) -> Installed:
        """Resolve and install ``requirements`` on the host (see the module docstring);
        RequirementError or InstallError say why not. The caller discards the result."""
        p = self.policy
        reqs = parse_requirements(requirements, p.max_packages_per_install, p.allow, p.block)
        async with self._lock, running():  # per kernel in order; a few server-wide
            self._rate_limit()
            cap = p.max_install_mib << 20
            work = Path(tempfile.mkdtemp(prefix="smol-install-"))  # 0700, ours
            try:
                (work / "requested.txt").write_text("".join(f"{r}\n" for r in reqs))
                # Downloads and unpacking are watched: a wheel that unpacks 1000:1 stops
                # at the kernel's remaining size (times two for the downloads, plus slack).
                budget = 2 * max(0, cap - self.used_bytes) + WORK_SLACK
                await self._uv(work, budget, "compile", "requested.txt", "--output-file",
                               "lock.txt", "--generate-hashes", "--no-header",
                               "--no-annotate")  # fmt: skip
                pinned = _pinned((work / "lock.txt").read_text())
                check_names([name for name, _ in pinned], p.allow, p.block)  # dependencies too
                tree = work / "tree"
                await self._uv(work, budget, "install", "-r", "lock.txt", "--require-hashes",
                               "--no-deps", "--target", str(tree))  # fmt: skip
                size = await asyncio.to_thread(_tree_bytes, tree)
                if self.used_bytes + size > cap:
                    raise InstallError(
                        f"this install is {size / (1 << 20):.1f} MiB and the kernel has "
                        f"{max(0, cap - self.used_bytes) / (1 << 20):.1f} MiB left of "
                        f"max_install_mib = {p.max_install_mib}"
                    )
                self.used_bytes += size
                return Installed(pinned, size, tree, work)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, work, True)
                raise

    def _rate_limit(self) -> None:
        now = time.monotonic()
        while self._recent and now - self._recent[0] > 60:
            self._recent.popleft()
        if len(self._recent) >= self.policy.max_installs_per_minute:
            raise InstallError(
                f"at most {self.policy.max_installs_per_minute} installs a minute "
                "(SmolVMProvisioner.max_installs_per_minute): try again shortly"
            )
        self._recent.append(now)

    async def _uv(self, work: Path, budget: int, command: str, *args: str) -> None:
        """Run ``uv pip COMMAND`` in ``work``; killed past UV_TIMEOUT, or once ``work``
        holds more than ``budget`` bytes, or when the caller is cancelled."""
        argv = [
            find_uv(), "pip", command, *args, "--no-config", "--only-binary", ":all:",
            # An interpreter named: uv must not look for one (a .venv above the work
            # folder, which another local user could plant, would be run).
            "--python", sys.executable, "--no-python-downloads",
            "--python-version", self.python_version, "--python-platform", GUEST_PLATFORM,
            "--cache-dir", str(work / "cache"),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))}
        env["UV_NO_PROGRESS"] = "1"
        env["UV_INDEX_URL"] = self.policy.index_url  # not in argv: ps shows argv
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        done = asyncio.ensure_future(proc.communicate())
        try:
            deadline = time.monotonic() + UV_TIMEOUT
            while not done.done():
                await asyncio.wait({done}, timeout=WATCH_INTERVAL)
                if done.done():
                    break
                if time.monotonic() > deadline:
                    raise InstallError(f"uv pip {command} took longer than {UV_TIMEOUT:.0f}s")
                if await asyncio.to_thread(_tree_bytes, work, budget + 1) > budget:
                    raise InstallError(
                        f"the packages are larger than this kernel may still install "
                        f"({budget >> 20} MiB with their downloads; max_install_mib = "
                        f"{self.policy.max_install_mib})"
                    )
            _, err = done.result()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            done.cancel()
        if proc.returncode != 0:
            raise InstallError(_uv_says(err.decode("utf-8", "replace")))


def _uv_says(text: str) -> str:
    """uv's error, bounded and escaped, with the cases users meet most said plainly."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    body = printable("\n".join(lines)[-1500:])
    if "not found in the package registry" in text or "was not found in" in text:
        return f"no such package on the index:\n{body}"
    if (
        "no wheels with a matching" in text
        or "has no usable wheels" in text
        or ("only-binary" in text or "building source distributions is disabled" in text)
    ):
        return (f"no binary wheel for the guest's Python and platform ({GUEST_PLATFORM}); "
                f"sdists are never built:\n{body}")  # fmt: skip
    return f"the install failed:\n{body}"


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No host user or group in what the guest gets."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _pinned(lock: str) -> list[tuple[str, str]]:
    out = []
    for line in lock.splitlines():
        if m := _PINNED.match(line.strip()):
            out.append((m.group(1), m.group(2)))
    return out


def _tree_bytes(tree: Path, stop_at: int | None = None) -> int:
    """Bytes of the regular files under ``tree`` (counting stops past ``stop_at``)."""
    total = 0
    for root, _, files in os.walk(tree):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # (uv renames as it goes)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                if stop_at is not None and total > stop_at:
                    return total
    return total
