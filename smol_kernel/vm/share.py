"""Host folders shared into a guest: ``HOST:GUEST[:ro|rw]``, docker's ``-v`` convention.

Guarantees (both backends):

* Nothing is shared unless asked for; ``ro`` is the default and is enforced by the VMM on
  the host (QEMU ``-fsdev readonly=on``, libkrun ``krun_add_virtiofs3(read_only)``), so root
  in the guest cannot remount it writable.
* The host side is resolved once, here: ``HOST`` is made absolute and its symlinks are
  resolved, and it must be an existing directory. The file servers (QEMU's 9p ``local``
  backend, libkrun's virtio-fs passthrough) never follow a symlink on the host side, so a
  symlink inside the folder that points outside it resolves in the *guest* (to a guest
  path), never to a host file.
* Guest paths are plain absolute paths (letters, digits, ``._+-/``) outside the system
  directories the guest agent and Python need.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MAX_SHARES = 8  # libkrun has about 11 virtio-mmio slots on x86_64; keep a margin
_GUEST_PATH = re.compile(r"^/[A-Za-z0-9._+/-]*$")
RESERVED_GUEST_PATHS = (
    "/proc", "/sys", "/dev", "/run", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
    "/etc", "/boot", "/opt/smol-kernel", "/var/lib/dpkg",
)  # fmt: skip


class ShareError(ValueError):
    """A share string is malformed or points at something unusable; the message says why."""


@dataclass(frozen=True)
class Share:
    """One host folder visible in the guest."""

    host: str  # absolute, symlinks resolved, an existing directory
    guest: str  # absolute normalized guest path
    read_only: bool = True

    @property
    def mode(self) -> str:
        return "ro" if self.read_only else "rw"

    def __str__(self) -> str:
        return f"{self.host}:{self.guest}:{self.mode}"


def split_share(text: str) -> tuple[str, str, bool]:
    """Check the syntax and the guest path of ``HOST:GUEST[:ro|rw]`` without touching the
    host; returns (host as written, normalized guest path, read_only)."""
    if not isinstance(text, str) or not text.strip():
        raise ShareError(f"share {text!r}: expected HOST:GUEST[:ro|rw], e.g. ~/data:/data:ro")
    parts = text.split(":")
    mode = "ro"
    if len(parts) >= 3 and parts[-1] in ("ro", "rw"):
        mode = parts.pop()
    if len(parts) < 2:
        raise ShareError(
            f"share {text!r}: expected HOST:GUEST[:ro|rw] (the guest path is missing), "
            "e.g. ~/data:/data:ro"
        )
    guest = parts.pop()
    host = ":".join(parts)
    if not host:
        raise ShareError(f"share {text!r}: the host folder is empty")
    return host, _guest_path(text, guest), mode == "ro"


def parse_share(text: str, base_dir: str | os.PathLike | None = None) -> Share:
    """Parse ``HOST:GUEST[:ro|rw]`` and resolve the host folder. A relative ``HOST`` is taken
    relative to ``base_dir`` (the kernel's working directory, i.e. the notebook's folder)."""
    host, guest, read_only = split_share(text)
    share = Share(_host_dir(text, host, base_dir), guest, read_only)
    check_host_folder(share, text)
    return share


def check_host_folder(share: Share, text: str | None = None) -> None:
    """Refuse a share through which a guest could change what runs on the host.

    A ``rw`` share must not contain, or lie inside, any folder whose files host processes
    import, execute or read as configuration (Python's import paths, smol-kernel's code,
    images, helper programs and runtime dirs, Jupyter's config, data and runtime dirs). Even a
    ``ro`` share must not overlap smol-kernel's runtime dir (other VMs' consoles)."""
    from ..trusted import protected_folders

    host = share.host
    for folder, why in protected_folders():
        if share.read_only and "runtime folders" not in why:
            continue
        if host == folder or _inside(folder, host) or _inside(host, folder):
            where = "contains" if _inside(folder, host) else "is inside"
            where = "is" if host == folder else where
            raise ShareError(
                f"share {text or str(share)!r}: {host} {where} {folder} ({why}); "
                + ("a guest must not see it" if share.read_only else
                   "a guest that can write there could run code on the host")
                + ". Share a folder that holds only your data (e.g. a subfolder)"
                + ("" if share.read_only else ", or this one read-only")
            )  # fmt: skip


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _host_dir(text: str, host: str, base_dir: str | os.PathLike | None) -> str:
    path = Path(host).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or os.getcwd()) / path
    real = Path(os.path.realpath(path))
    if not real.exists():
        raise ShareError(f"share {text!r}: host folder {path} does not exist; create it first")
    if not real.is_dir():
        raise ShareError(
            f"share {text!r}: {path} is not a folder; share the folder that contains it"
        )
    if not os.access(real, os.R_OK | os.X_OK):
        raise ShareError(f"share {text!r}: no permission to read {real}")
    return str(real)


def _guest_path(text: str, guest: str) -> str:
    if not guest.startswith("/"):
        raise ShareError(f"share {text!r}: the guest path {guest!r} must be absolute")
    if not _GUEST_PATH.match(guest):
        raise ShareError(
            f"share {text!r}: the guest path {guest!r} may only contain letters, digits and "
            "._+-/ characters"
        )
    norm = os.path.normpath(guest)
    if norm == "/" or any(part == ".." for part in guest.split("/")):
        raise ShareError(f"share {text!r}: choose a guest folder below /, e.g. /data")
    for reserved in RESERVED_GUEST_PATHS:
        if norm == reserved or norm.startswith(reserved + "/"):
            raise ShareError(
                f"share {text!r}: {norm} is a guest system folder ({reserved}); mount the "
                "share elsewhere, e.g. /data or /root/data"
            )
    return norm


def check_shares(shares: tuple[Share, ...] | list[Share]) -> None:
    """Checks across shares: how many, no guest path used twice or nested, and none of the
    host folders a guest must not reach (``check_host_folder``)."""
    if len(shares) > MAX_SHARES:
        raise ShareError(f"{len(shares)} shares: at most {MAX_SHARES} are supported")
    seen: list[str] = []
    for share in shares:
        check_host_folder(share)
        for other in seen:
            if (
                share.guest == other
                or share.guest.startswith(other + "/")
                or other.startswith(share.guest + "/")
            ):
                raise ShareError(
                    f"shares at guest paths {other} and {share.guest} overlap; give each "
                    "share its own folder"
                )
        seen.append(share.guest)
