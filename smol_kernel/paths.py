"""Where smol-kernel keeps things on the host.

* cache dir (images, helper tools, probe results): ``$SMOL_KERNEL_CACHE_DIR`` or the
  platformdirs user cache dir.
* runtime dir (one subdirectory per running VM: sockets, overlay disk, console log): kept
  short because unix socket paths are limited to 107 bytes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

import platformdirs

from .error_root import SmolKernelError


def cache_dir() -> Path:
    env = os.environ.get("SMOL_KERNEL_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("smol-kernel"))


def images_dir() -> Path:
    return cache_dir() / "images"


def tools_dir() -> Path:
    return cache_dir() / "tools"


class RuntimeDirError(SmolKernelError, OSError):
    """The runtime folder exists but is not safely ours; the message says what to do."""


class PrivateDirError(SmolKernelError, OSError):
    """A folder that must be this user's alone is not; the message says what to do."""


class ForeignParentError(PrivateDirError):
    """The folder's parent belongs to another user, who could rename it away (even with the
    sticky bit: a folder's owner may rename what is in it)."""


def _problem(st: os.stat_result) -> str | None:
    """Why a folder with this ``lstat`` is not private to this user (None: it is)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
    if st.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):o}: other users can use it"
    return None


def private_dir(path: Path, why: str, fix: str) -> Path:
    """``path``, created 0700 if missing (its parents as usual), then checked: a folder of
    this user's, not a symbolic link, that no other user can enter or write. Its parent
    must not let another user swap it: this user's or root's (ForeignParentError), writable
    by group or others only with the sticky bit, as /tmp. ``why`` says what another user
    could do with it, ``fix`` what to set instead (PrivateDirError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    problem = _problem(os.lstat(path))
    parent = os.stat(path.parent)
    if problem is None and parent.st_uid not in (0, os.getuid()):
        raise ForeignParentError(f"{path} lies in {path.parent}, which uid {parent.st_uid} "
                                 f"owns and so could swap it; {why}; {fix}")  # fmt: skip
    if problem is None and parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX:
        problem = f"lies in {path.parent}, which other users can write (without the sticky bit)"
    if problem:
        raise PrivateDirError(f"{path} {problem}; {why}. Remove it (or fix it: chmod 700, "
                              f"owned by you), or {fix}")  # fmt: skip
    return path


def user_store(name: str, env: str) -> Path:
    """This user's own folder for ``name`` (templates, checkpoints): ``$env`` if set, else
    ``<cache>/<name>/u<uid>``, or, when the cache folder is shared and this user cannot
    write there, the same in the user's own cache folder. Always ``private_dir``: what is
    in it is restored into this user's kernels, so no other user may put anything there."""
    why = f"another user could plant {name} there that your kernels would restore"
    fix = f"set {env} to a folder of your own"
    if value := os.environ.get(env):
        return private_dir(Path(value), why, fix)
    own = f"u{os.getuid()}"
    try:
        return private_dir(cache_dir() / name / own, why, fix)
    except (PermissionError, ForeignParentError):  # a shared cache we cannot use for this
        fallback = Path(platformdirs.user_cache_dir("smol-kernel")) / name / own
        if fallback == cache_dir() / name / own:
            raise
        return private_dir(fallback, why, fix)


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses a symbolic link as the last component (OSError)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def runtime_dir() -> Path:
    """The runtime folder, created 0700 if missing, and checked on every use: a folder of
    ours, not a symlink, that no other user can enter or write. Under JupyterHub's local
    spawners ``XDG_RUNTIME_DIR`` is often unset and it lives in /tmp, where another local
    user could create it first and plant VM state or swap a VM's sockets."""
    env = os.environ.get("SMOL_KERNEL_RUNTIME_DIR")
    if env:
        path = Path(env)
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
            path = Path(xdg) / "smol-kernel"
        else:
            path = Path(tempfile.gettempdir()) / f"smol-kernel-{os.getuid()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    problem = _problem(os.lstat(path))
    if problem:
        raise RuntimeDirError(
            f"smol-kernel's runtime folder {path} {problem}; another user could control "
            "your VMs through it. Remove it (or fix it: chmod 700, owned by you), or set "
            "SMOL_KERNEL_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a folder of your own"
        )
    return path
