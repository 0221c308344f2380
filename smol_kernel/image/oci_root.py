"""Turn an unpacked container root into a guest root: find its Python, add our pieces.

The unpacked tree is the image's: any name in it may be a symlink planted to reach host
files. Everything here looks at it with ``lstat``/``readlink`` only and writes into it
through ``resolve_in_root`` paths, replacing (never following) the last component. Nothing
from the tree is executed or imported on the host.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..guest import protocol as P
from .oci import OciError, remove_entry, resolve_in_root

PYTHON_CANDIDATES = ("usr/bin/python3", "usr/local/bin/python3", "bin/python3")
MIN_PYTHON = (3, 9)
GUEST_DIR = P.GUEST_AGENT_DIR.lstrip("/")


@dataclass(frozen=True)
class GuestPython:
    """The image's python3, as paths inside the guest."""

    executable: str  # e.g. /usr/local/bin/python3.12 (symlinks resolved)
    version: str  # "3.12"
    site: str  # where our pip packages go, on that Python's sys.path
    ipykernel: bool  # the image has ipykernel
    musl: bool  # built on musl libc (Alpine): manylinux wheels do not run there


def _exists(path: Path) -> bool:
    return path.is_symlink() or path.exists()


def find_python(tree: Path) -> GuestPython:
    """The image's python3, or an ``OciError`` that says how to add one."""
    exe = None
    for cand in PYTHON_CANDIDATES:
        p = resolve_in_root(tree, cand, follow_last=True)
        st = p.lstat() if _exists(p) else None
        if st and stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            exe = p
            break
    if exe is None:
        raise OciError(
            "the image has no python3 (looked for /usr/bin/python3 and /usr/local/bin/python3)."
            " Build it from an image that has Python 3.9 or newer, e.g. FROM python:3.12-slim,"
            " or install python3 in it."
        )
    prefix = exe.parent.parent.relative_to(tree).as_posix()
    prefix = "" if prefix == "." else prefix
    lib = resolve_in_root(tree, f"{prefix}/lib", follow_last=True)
    m = re.fullmatch(r"python(3\.\d+)", exe.name)
    if m:
        versions = [m.group(1)]
    else:  # an executable named plain python3: its prefix's standard library says
        found = lib.iterdir() if lib.is_dir() else []
        versions = sorted(v.name[6:] for v in found if re.fullmatch(r"python3\.\d+", v.name))
    stdlib = [
        v
        for v in versions
        if resolve_in_root(tree, f"{prefix}/lib/python{v}/os.py", follow_last=True).is_file()
    ]
    if len(stdlib) != 1:
        raise OciError(
            f"the image's python3 (/{exe.relative_to(tree)}) has no standard library under "
            f"/{prefix}/lib; is it a complete Python installation?"
        )
    version = stdlib[0]
    if tuple(int(x) for x in version.split(".")) < MIN_PYTHON:
        raise OciError(
            f"the image's Python is {version}; the guest agent needs "
            f"{'.'.join(map(str, MIN_PYTHON))} or newer."
        )
    debian = prefix == "usr"  # Debian's python3 reads /usr/local/.../dist-packages
    own_site = f"/{prefix}/lib/python{version}/site-packages".replace("//", "/")
    site = f"/usr/local/lib/python{version}/dist-packages" if debian else own_site
    places = {
        site,
        own_site,
        f"/usr/local/lib/python{version}/dist-packages",
        "/usr/lib/python3/dist-packages",
    }
    has_ipykernel = any(
        resolve_in_root(tree, f"{d}/ipykernel/__init__.py", follow_last=True).is_file()
        for d in places
    )
    musl = _exists(resolve_in_root(tree, "lib/ld-musl-x86_64.so.1"))
    return GuestPython(f"/{exe.relative_to(tree)}", version, site, has_ipykernel, musl)


def put_file(tree: Path, guest_path: str, source: Path) -> None:
    """Copy the host file ``source`` to ``guest_path`` in the tree, replacing whatever is
    there; mode and mtime kept (a .pyc checks its source's mtime), owner root."""
    dest = resolve_in_root(tree, guest_path)
    _make_dirs(tree, dest.parent)
    remove_entry(dest)
    st = source.stat()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(source, "rb") as src, os.fdopen(os.open(dest, flags, 0o600), "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    _own(dest, stat.S_IMODE(st.st_mode))
    os.utime(dest, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)


def put_tree(tree: Path, guest_dir: str, source: Path) -> None:
    """Copy the host folder ``source`` into ``guest_dir`` of the tree (merging)."""
    for top, dirs, files in os.walk(source):
        rel = os.path.relpath(top, source)
        here = guest_dir if rel == "." else f"{guest_dir}/{rel}"
        _make_dirs(tree, resolve_in_root(tree, here, follow_last=True))
        for name in files:
            src = Path(top, name)
            if src.is_symlink():  # pip does not make these; a link would point at host files
                raise OciError(f"unexpected symlink {src} in the packages to add")
            put_file(tree, f"{here}/{name}", src)
        dirs.sort()


def link_python(tree: Path, python: GuestPython) -> None:
    """The initramfs starts the agent with /usr/bin/python3: make it the image's python."""
    if python.executable == "/usr/bin/python3":
        return
    link = resolve_in_root(tree, "usr/bin/python3")
    if _exists(link) and resolve_in_root(tree, "usr/bin/python3", follow_last=True) == (
        resolve_in_root(tree, python.executable, follow_last=True)
    ):
        return
    _make_dirs(tree, link.parent)
    remove_entry(link)
    os.symlink(python.executable, link)


def remove(tree: Path, guest_path: str) -> None:
    """Remove ``guest_path`` from the tree (a link itself, not what it points to)."""
    remove_entry(resolve_in_root(tree, guest_path))


def make_dirs(tree: Path, *guest_dirs: str) -> None:
    for d in guest_dirs:
        _make_dirs(tree, resolve_in_root(tree, d, follow_last=True))


def _make_dirs(tree: Path, path: Path) -> None:
    missing = []
    while not path.is_dir() and path != tree:
        if _exists(path):  # a file, or a symlink resolve_in_root chose not to follow
            raise OciError(f"/{path.relative_to(tree)} is in the way of a folder we add")
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        p.mkdir(mode=0o755)
        _own(p, 0o755)


def _own(path: Path, mode: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, 0, 0, follow_symlinks=False)
    os.chmod(path, mode)


def tree_size(tree: Path) -> tuple[int, int]:
    """(bytes the files use, number of inodes), counting hard links once."""
    seen: set[int] = set()
    used, count = 0, 1
    for top, dirs, files in os.walk(tree):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            count += 1
            used += (st.st_size + 4095) // 4096 * 4096 if stat.S_ISREG(st.st_mode) else 4096
    return used, count
