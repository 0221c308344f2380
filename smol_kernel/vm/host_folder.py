"""Host folders opened so that nobody can redirect them: no symlink is followed anywhere on
the path, and a folder is known by its identity (``st_dev``, ``st_ino``), not its name.

A guest with a ``rw`` share can replace any folder in it by a symlink, and the notebook
folder that relative share paths start from may be such a share; names compared as strings
miss bind mounts and case-insensitive file systems. So shares are opened component by
component with ``O_NOFOLLOW`` (``open_folder``), compared by identity, and handed to the VMM
as the descriptor we opened (``/proc/self/fd/N``), which no later rename or symlink changes.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from ..error_root import SmolKernelError

Ident = tuple[int, int]  # (st_dev, st_ino)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class FolderError(SmolKernelError, ValueError):
    """A folder cannot be opened safely; the message says which part of the path and why."""


def open_folder(path: str) -> int:
    """An ``O_PATH`` descriptor of the absolute, normalized ``path``, opened one component
    at a time without following any symlink. FolderError if a component is a symlink, is
    missing or is not a folder."""
    if not os.path.isabs(path) or os.path.normpath(path) != path or "\0" in path:
        raise FolderError(f"{path!r} is not an absolute, normalized path")
    fd = os.open("/", _DIR_FLAGS)
    walked = ""
    try:
        for part in [p for p in path.split("/") if p]:
            walked += "/" + part
            try:
                nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                raise _why(walked, e, fd, part) from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(walked: str, e: OSError, parent: int, part: str) -> FolderError:
    if e.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            mode = os.lstat(part, dir_fd=parent).st_mode
        except OSError:
            mode = 0
        if stat.S_ISLNK(mode):
            target = os.readlink(part, dir_fd=parent)
            return FolderError(
                f"{walked} is a symbolic link (to {target}); share the folder it points to "
                "by its real path (symlinks are not followed: a guest could change them)"
            )
        return FolderError(f"{walked} is not a folder")
    if e.errno == errno.ENOENT:
        return FolderError(f"host folder {walked} does not exist; create it first")
    if e.errno == errno.EACCES:
        return FolderError(f"no permission to open {walked}")
    return FolderError(f"cannot open {walked}: {e.strerror}")


def ident(fd_or_path: int | str) -> Ident:
    st = os.stat(fd_or_path)
    return st.st_dev, st.st_ino


def fd_path(fd: int) -> str:
    """The path the kernel resolves an open descriptor to."""
    return os.readlink(f"/proc/self/fd/{fd}")


def ancestors(fd: int, limit: int = 256) -> list[Ident]:
    """Identities of the folder and of each folder above it, up to ``/`` (physical parents,
    whatever names lead there)."""
    out = [ident(fd)]
    cur = os.open(".", _DIR_FLAGS, dir_fd=fd)
    try:
        for _ in range(limit):
            parent = os.open("..", _DIR_FLAGS, dir_fd=cur)
            os.close(cur)
            cur = parent
            here = ident(cur)
            if here == out[-1]:
                break
            out.append(here)
    finally:
        os.close(cur)
    return out


@dataclass(frozen=True)
class KnownFolder:
    """A folder the checks compare against, by identity: itself and what contains it."""

    path: str
    ident: Ident
    ancestors: tuple[Ident, ...]

    @classmethod
    def of(cls, path: str) -> KnownFolder | None:
        """For our own folders (Python's paths, Jupyter's, the home folder): symlinks in
        *their* paths are followed, they are the host's configuration. None if missing."""
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError:
            return None
        try:
            chain = ancestors(fd)
        finally:
            os.close(fd)
        return cls(path, chain[0], tuple(chain))

    @classmethod
    def nearest(cls, path: str) -> KnownFolder | None:
        """For a folder of ours that does not exist yet: the deepest existing folder it
        would be made in (whatever holds that will hold it)."""
        parent = os.path.dirname(os.path.abspath(path))
        while parent and parent != os.path.dirname(parent):
            if (known := cls.of(parent)) is not None:
                return known
            parent = os.path.dirname(parent)
        return cls.of("/")

    def relation(self, chain: list[Ident]) -> str | None:
        """How a folder with ancestor identities ``chain`` (itself first) relates to this
        one: "is", "is inside", "contains", or None."""
        if chain[0] == self.ident:
            return "is"
        if self.ident in chain:
            return "is inside"
        if chain[0] in self.ancestors:
            return "contains"
        return None
