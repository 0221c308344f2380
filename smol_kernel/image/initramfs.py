"""A tiny uncompressed initramfs: busybox, our /init, and only the modules the guest needs.

Written as a cpio "newc" archive in pure Python so no root, cpio binary or fakeroot is needed
(device nodes are recorded in the archive, not created on the host). It is left uncompressed:
under TCG, decompressing costs more than reading a few extra MiB.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable
from pathlib import Path

from ..error_root import SmolKernelError

# What the guest needs; dependencies are resolved from the modules' own .modinfo.
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "overlay",
    "vmw_vsock_virtio_transport",
    "virtio_console",  # the virtio-serial port that carries every stream (QEMU)
    "virtio_balloon",  # free page reporting: the host reclaims memory the guest freed
)
# Loaded by /init only when asked for (``modules.<group>``), so default boots pay nothing.
OPTIONAL_MODULES = {
    "net": ("virtio_net",),  # network=True (passt)
    "9p": ("9pnet_virtio", "9p"),  # shares under QEMU
}


class ModuleError(SmolKernelError):
    """A kernel module the guest needs is missing from the kernel package."""


def _modinfo_field(ko: bytes, field: str) -> list[str]:
    out: list[str] = []
    for m in re.finditer(rb"(?:^|\0)" + field.encode() + rb"=([^\0]*)", ko):
        out.append(m.group(1).decode("ascii", "replace"))
    return out


def resolve_modules(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """Return the .ko files for ``wanted`` and their dependencies, in load order."""
    index: dict[str, Path] = {}
    for ko in modules_dir.rglob("*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    builtin_list = modules_dir / "modules.builtin"
    builtin = set()
    if builtin_list.exists():
        builtin = {
            Path(line).name.removesuffix(".ko").replace("-", "_")
            for line in builtin_list.read_text().split()
        }
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in order or name in visiting or name in builtin:
            return
        if name not in index:
            raise ModuleError(f"kernel module {name!r} not found under {modules_dir}")
        visiting.add(name)
        data = index[name].read_bytes()
        deps = [d for f in _modinfo_field(data, "depends") for d in f.split(",") if d]
        for soft in _modinfo_field(data, "softdep"):
            # "pre: crc32c" -- only hard-load soft deps we can find as modules
            for word in soft.replace("pre:", " ").replace("post:", " ").split():
                if word.replace("-", "_") in index:
                    deps.append(word)
        for dep in deps:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return [index[n] for n in order]


class CpioWriter:
    """Minimal cpio newc writer."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (
                self._ino,
                mode,
                0,
                0,
                1,
                0,
                len(data),
                0,
                0,
                rdev[0],
                rdev[1],
                len(name_b),
                0,
            )
        )
        self._ino += 1
        buf = hdr.encode() + name_b
        buf += b"\0" * (-len(buf) % 4)
        buf += data
        buf += b"\0" * (-len(buf) % 4)
        self._parts.append(buf)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = CpioWriter()
        trailer._ino = 0
        trailer._entry("TRAILER!!!", 0)
        data = b"".join(self._parts) + trailer._parts[0]
        return data + b"\0" * (-len(data) % 512)


def build_initramfs(
    busybox: Path,
    init_script: bytes,
    modules: list[Path],
    out: Path,
    optional: dict[str, list[Path]] | None = None,
) -> int:
    """Write the initramfs to ``out``; return its size in bytes. ``modules`` are listed in
    ``modules.order`` (always loaded), each optional group in ``modules.<group>``."""
    cpio = CpioWriter()
    for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys", "ro", "rw", "newroot"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init_script, 0o755)
    written: set[str] = set()
    for list_name, kos in [("modules.order", modules)] + [
        (f"modules.{group}", group_kos) for group, group_kos in (optional or {}).items()
    ]:
        names = []
        for ko in kos:
            if ko.name not in written:
                cpio.file(f"lib/modules/{ko.name}", ko.read_bytes())
                written.add(ko.name)
            names.append(ko.name)
        cpio.file(list_name, ("\n".join(names) + "\n").encode())
    data = cpio.getvalue()
    out.write_bytes(data)
    return len(data)


def read_cpio(data: bytes) -> list[tuple[str, int, bytes]]:
    """Entries (name, mode, data) of a newc archive such as the one we write. An imported
    image's archive is anyone's: names are checked (relative, no ``..``, no empty or NUL
    part); ValueError says which entry is wrong."""
    out = []
    pos = 0
    while pos + 110 <= len(data):
        hdr = data[pos : pos + 110]
        if hdr[:6] != b"070701":
            raise ValueError(f"not a newc cpio archive at offset {pos}")
        fields = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body_start = name_start + namesize
        body_start += -body_start % 4
        body = data[body_start : body_start + filesize]
        pos = body_start + filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            break
        parts = name.split("/")
        if name.startswith("/") or "\0" in name or any(p in ("", "..") for p in parts):
            if name not in (".", "./"):
                raise ValueError(f"cpio entry {name!r} is not a plain relative path")
            continue
        out.append((name.removeprefix("./"), mode, body))
    return out
