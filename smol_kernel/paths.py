"""Where smol-kernel keeps things on the host.

* cache dir (images, helper tools, probe results): ``$SMOL_KERNEL_CACHE_DIR`` or the
  platformdirs user cache dir.
* runtime dir (one subdirectory per running VM: sockets, overlay disk, console log): kept
  short because unix socket paths are limited to 107 bytes.
"""

from __future__ import annotations

import os
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


def runtime_dir() -> Path:
    env = os.environ.get("SMOL_KERNEL_RUNTIME_DIR")
    if env:
        path = Path(env)
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
            path = Path(xdg) / "smol-kernel"
        else:
            path = Path(tempfile.gettempdir()) / f"smol-kernel-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
