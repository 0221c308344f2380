"""Host folders shared into a guest: ``HOST:GUEST[:ro|rw]``, docker's ``-v`` convention.

Guarantees (both backends):

* Nothing is shared unless asked for; ``ro`` is the default and is enforced by the VMM on
  the host (QEMU ``-fsdev readonly=on``, libkrun ``krun_add_virtiofs3(read_only)``), so root
  in the guest cannot remount it writable.
* The host side cannot be redirected: ``HOST`` is made absolute (relative to the notebook's
  folder) and opened one component at a time without following any symlink
  (``host_folder.open_folder``); the folder is known by its identity (device, inode), which
  is checked again when each VM starts, pooled ones included, and the VMM gets the folder we
  opened as a descriptor, not its name. The file servers (QEMU's 9p ``local`` backend,
  libkrun's virtio-fs) never follow a symlink on the host side, so a symlink inside the
  folder resolves in the *guest*.
* No share is, contains or lies in a folder of secrets (keys, tokens, Jupyter's runtime,
  config and data folders, smol-kernel's runtime folder), even read-only, nor the home
  folder itself unless allowed; no ``rw`` share is, contains or lies in a folder host code
  comes from (``trusted.protected_folders``). Two shares of one folder, or of nested
  folders, are refused: a ``ro`` share must not have a ``rw`` view.
* Guest paths are plain absolute paths (letters, digits, ``._+-/``) outside the system
  directories the guest agent and Python need.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

from ..error_root import SmolKernelError
from ..guest import protocol as P
from .host_folder import FolderError, Ident, KnownFolder, ancestors, ident, open_folder

MAX_SHARES = 8  # libkrun has about 11 virtio-mmio slots on x86_64; keep a margin
_GUEST_PATH = re.compile(r"^/[A-Za-z0-9._+/-]*$")
RESERVED_GUEST_PATHS = (
    "/proc", "/sys", "/dev", "/run", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
    "/etc", "/boot", P.GUEST_AGENT_DIR, "/var/lib/dpkg",
)  # fmt: skip


class ShareError(SmolKernelError, ValueError):
    """A share string is malformed or points at something unusable; the message says why."""


@dataclass(frozen=True)
class Share:
    """One host folder visible in the guest."""

    host: str  # absolute, normalized, no symlink on it, an existing directory
    guest: str  # absolute normalized guest path
    read_only: bool = True
    ident: Ident = (0, 0)  # (st_dev, st_ino) of the folder when it was checked
    home_allowed: bool = False  # the home folder, shared because allow_home_share is on

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


def parse_share(
    text: str, base_dir: str | os.PathLike | None = None, allow_home: bool = False
) -> Share:
    """Parse ``HOST:GUEST[:ro|rw]``, open the host folder without following symlinks and
    check it (``check_host_folder``). A relative ``HOST`` is taken relative to ``base_dir``
    (the kernel's working directory, i.e. the notebook's folder)."""
    host, guest, read_only = split_share(text)
    path = os.path.expanduser(host)
    if not os.path.isabs(path):
        path = os.path.join(os.fspath(base_dir or os.getcwd()), path)
    path = os.path.normpath(path)
    with _opened(text, path) as fd:
        share = Share(path, guest, read_only, ident(fd))
        if check_host_folder(share, text, fd, allow_home) == "home":
            share = Share(path, guest, read_only, share.ident, home_allowed=True)
    return share


@contextlib.contextmanager
def _opened(text: str, path: str):
    try:
        fd = open_folder(path)
    except FolderError as e:
        raise ShareError(f"share {text!r}: {e}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def open_share(share: Share) -> int:
    """Open a checked share again for a VM: an ``O_PATH`` descriptor of the same folder
    (same identity, no symlink on the way), checked again. The caller closes it."""
    try:
        fd = open_folder(share.host)
    except FolderError as e:
        raise ShareError(f"share {share}: {e}") from None
    try:
        if ident(fd) != share.ident:
            raise ShareError(
                f"share {share}: {share.host} is no longer the folder the kernel was planned "
                "with (it was replaced or moved); start the kernel again"
            )
        check_host_folder(share, None, fd, share.home_allowed)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_host_folder(
    share: Share, text: str | None = None, fd: int | None = None, allow_home: bool = False
) -> str | None:
    """Refuse a share through which a guest could read secrets or change what runs on the
    host (see the module doc). Folders are compared by identity, not by name. Returns
    "home" when the share is the home folder, allowed by ``allow_home``."""
    from ..trusted import protected_folders

    shown = text or str(share)
    if fd is None:
        with _opened(shown, share.host) as opened:
            return check_host_folder(share, text, opened, allow_home)
    chain = ancestors(fd)
    folders = protected_folders()
    home = next((KnownFolder.of(f.path) for f in folders if f.home), None)
    if allow_home and share.read_only and home is not None and home.ident == chain[0]:
        return "home"  # the administrator allowed the home folder, and all it holds
    missing = []
    for folder in folders:
        if not (folder.secret or folder.home or not share.read_only):
            continue
        known = KnownFolder.of(folder.path)
        if known is None:
            missing.append(folder)
        elif (relation := known.relation(chain)) is not None:
            if folder.home and relation == "is inside":
                continue  # a folder in the home folder: the other entries decide
            _refuse(share, shown, relation, folder)
    # Not made yet: a guest that can write where one would be made could make it (a .pth
    # in a new site-packages, a config file in a new ~/.jupyter).
    for folder in missing if not share.read_only else ():
        parent = KnownFolder.nearest(folder.path)
        if parent is not None and parent.relation(chain) in ("is", "contains"):
            _refuse(share, shown, "would contain (once it is created)", folder)
    return None


def _refuse(share: Share, shown: str, relation: str, folder) -> None:
    hint = ("a guest must not see it. Share a folder that holds only your data"
            if folder.secret or folder.home else
            "a guest that can write there could run code on the host. Share a folder "
            "that holds only your data, or this one read-only")  # fmt: skip
    if folder.home and share.read_only:
        hint += " (an administrator may allow the home folder: allow_home_share)"
    raise ShareError(f"share {shown!r}: {share.host} {relation} {folder.path} "
                     f"({folder.why}); {hint}")  # fmt: skip


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
    """Checks across shares: how many, no guest path used twice or nested, and no host
    folder shared twice or inside another share (by identity)."""
    if len(shares) > MAX_SHARES:
        raise ShareError(f"{len(shares)} shares: at most {MAX_SHARES} are supported")
    seen: list[str] = []
    for share in shares:
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
    chains: list[tuple[Share, list[Ident]]] = []
    for share in shares:
        if share.ident == (0, 0):
            continue  # not opened (a spec built by hand); backends open it with open_share
        with _opened(str(share), share.host) as fd:
            chains.append((share, ancestors(fd)))
    for i, (a, chain_a) in enumerate(chains):
        for b, chain_b in chains[i + 1 :]:
            if a.ident == b.ident or a.ident in chain_b or b.ident in chain_a:
                raise ShareError(
                    f"shares {a} and {b} are the same host folder or one holds the other; "
                    "a guest would see one folder twice (and a read-only one writable): "
                    "share separate folders"
                )
