"""Where smol-kernel keeps things on the host.

* cache dir (images, helper tools, probe results): ``$SMOL_KERNEL_CACHE_DIR`` or the
  platformdirs user cache dir.
* runtime dir (one subdirectory per running VM: sockets, overlay disk, console log): kept
  short because unix socket paths are limited to 107 bytes.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    env = os.environ.get("SMOL_KERNEL_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("smol-kernel"))


def images_dir() -> Path:
    return cache_dir() / "images"


def tools_dir() -> Path:
    return cache_dir() / "tools"


class RuntimeDirError(OSError):
    """The runtime folder exists but is not safely ours; the message says what to do."""


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
    st = os.lstat(path)
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):o}: other users can use it"
    if problem:
        raise RuntimeDirError(
            f"smol-kernel's runtime folder {path} {problem}; another user could control "
            "your VMs through it. Remove it (or fix it: chmod 700, owned by you), or set "
            "SMOL_KERNEL_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a folder of your own"
        )
    return path
