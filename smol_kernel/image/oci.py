"""Container images already on disk: an OCI image layout (a folder, or a tar of one) or a
``docker save`` archive, read without a registry, and unpacked into a folder.

What it guarantees about the host, whatever the image holds:

* Nothing in the image runs on the host; its files are data (their names, modes, owners,
  link targets), never opened as anything but bytes to copy.
* Every write stays inside the destination folder. Paths are resolved as if the folder
  were ``/`` (``..`` stops at it; a symlink, absolute or not, is followed inside it, as a
  container runtime would), and the last component is replaced, never followed.
* Each layer is applied in order with its whiteouts: ``.wh.NAME`` deletes ``NAME`` from
  the layers below, ``.wh..wh..opq`` empties its folder of what the layers below put there.
* Every blob read is checked against its sha256 (manifest, config, compressed layer) and
  every layer against the config's ``diff_ids``; a mismatch is an ``OciError``.

Device nodes are skipped (the guest's ``/dev`` is a devtmpfs), as are extended attributes.
Layers may be plain or gzip tars; zstd layers are refused with what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..error_root import SmolKernelError
from .store import max_image_bytes

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
REF_NAME = "org.opencontainers.image.ref.name"
MAX_JSON = 16 << 20  # a manifest, index or config larger than this is not one
MAX_SYMLINK_HOPS = 40


class OciError(SmolKernelError, ValueError):
    """The container image cannot be read or used; the message says why."""


@dataclass
class Layer:
    locator: str  # blob digest (OCI layout) or member path (docker save)
    digest: str | None  # sha256 of the blob as stored, when the format names it
    diff_id: str | None  # sha256 of the uncompressed tar, from the config


@dataclass
class OciImage:
    """One image of an archive: its config, its layers in order, and an identity (the
    manifest's digest, or the config's for ``docker save``) that changes with any byte."""

    source: Path
    kind: str  # "oci" or "docker-save"
    identity: str
    config: dict
    layers: list[Layer]
    _blobs: _Blobs = field(repr=False)

    @property
    def platform(self) -> str:
        return f"{self.config.get('os', '?')}/{self.config.get('architecture', '?')}"


# ------------------------------------------------------------------ reading the archive
class _Blobs:
    """Files of a folder or of a tar, by relative path; only regular files inside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
            for m in self._tar:
                self._members[_clean(m.name)] = m
        except (tarfile.TarError, EOFError, OSError) as e:
            self.close()
            raise OciError(f"{path} is neither a folder nor a readable tar archive: {e}") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def has(self, rel: str) -> bool:
        if self._tar is None:
            return (self.path / rel).is_file()
        return _clean(rel) in self._members

    def open(self, rel: str) -> IO[bytes]:
        name = _clean(rel)
        if not name or ".." in name.split("/"):
            raise OciError(f"the image refers to {rel!r}, outside its archive")
        if self._tar is None:
            top = os.path.realpath(self.path)
            real = os.path.realpath(self.path / name)
            if os.path.commonpath([real, top]) != top:
                raise OciError(f"{rel!r} points outside the image folder")
            if not os.path.isfile(real):
                raise OciError(f"the image is incomplete: {rel} is missing from {self.path}")
            return open(real, "rb")
        member = self._members.get(name)
        if member is None or not (member.isfile() or member.islnk() or member.issym()):
            raise OciError(f"the image is incomplete: {rel} is missing from {self.path}")
        f = self._tar.extractfile(member)  # links resolve to members of the archive
        if f is None:
            raise OciError(f"{rel} in {self.path} is not a file")
        return f

    def read_json(self, rel: str, digest: str | None = None) -> tuple[dict | list, bytes]:
        with self.open(rel) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise OciError(f"{rel} in {self.path} is too large for a manifest or config")
        if digest is not None:
            _check_digest(hashlib.sha256(data).hexdigest(), digest, rel)
        try:
            return json.loads(data), data
        except ValueError as e:
            raise OciError(f"{rel} in {self.path} is not valid JSON: {e}") from None


def _clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _blob_path(digest: str) -> str:
    alg, _, hexdigest = digest.partition(":")
    if (
        alg != "sha256"
        or len(hexdigest) != 64
        or not all(c in "0123456789abcdef" for c in hexdigest)
    ):
        raise OciError(f"unsupported or malformed digest {digest!r} (only sha256 is supported)")
    return f"blobs/sha256/{hexdigest}"


def _check_digest(actual_hex: str, expected: str, what: str) -> None:
    if f"sha256:{actual_hex}" != expected:
        raise OciError(
            f"{what} is corrupt: its sha256 is {actual_hex}, the image says {expected}. "
            "Save or copy the image again."
        )


@contextmanager
def open_image(path: Path, platform: str = "linux/amd64") -> Iterator[OciImage]:
    """The image in ``path`` (an OCI layout folder or tar, or a ``docker save`` tar) for
    ``platform``; ``OciError`` says what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise OciError(f"{path} does not exist: give an OCI image folder or a tar file")
    blobs = _Blobs(path)
    try:
        if blobs.has("index.json") and blobs.has("oci-layout"):
            image = _open_oci(path, blobs, platform)
        elif blobs.has("manifest.json"):
            image = _open_docker_save(path, blobs)
        else:
            raise OciError(
                f"{path} is not an OCI image layout (no oci-layout and index.json) nor a "
                "`docker save` archive (no manifest.json). Make one with "
                "`docker save IMAGE -o image.tar` or `skopeo copy docker://IMAGE oci:DIR`."
            )
        os_, _, arch = platform.partition("/")
        if (image.config.get("os"), image.config.get("architecture")) != (os_, arch):
            raise OciError(
                f"the image is for {image.platform}; this host runs {platform} guests. "
                f"Save the {platform} variant (e.g. docker pull --platform {platform})."
            )
        yield image
    finally:
        blobs.close()


def _open_oci(path: Path, blobs: _Blobs, platform: str) -> OciImage:
    index, _ = blobs.read_json("index.json")
    candidates: list[tuple[dict, str]] = []  # (descriptor, platform or "")

    def walk(idx: dict | list, depth: int) -> None:
        if not isinstance(idx, dict) or depth > 4:
            raise OciError(f"{path}: malformed image index")
        for desc in idx.get("manifests") or []:
            media = desc.get("mediaType", "")
            plat = desc.get("platform") or {}
            where = f"{plat.get('os', '')}/{plat.get('architecture', '')}" if plat else ""
            if media in INDEX_TYPES:
                sub, _ = blobs.read_json(_blob_path(desc["digest"]), desc["digest"])
                walk(sub, depth + 1)
            elif (
                media in MANIFEST_TYPES
                and where != "unknown/unknown"  # attestations
                and all(c[0].get("digest") != desc.get("digest") for c in candidates)  # retags
            ):
                candidates.append((desc, where))

    walk(index, 0)
    matching = [c for c in candidates if c[1] in ("", platform)]
    if len(matching) > 1:
        matching = [c for c in matching if c[1] == platform] or matching
    if len(matching) != 1:
        found = sorted(
            {
                " ".join(x for x in (c[1], (c[0].get("annotations") or {}).get(REF_NAME)) if x)
                or "unnamed"
                for c in candidates
            }
        ) or ["none"]
        raise OciError(
            f"{path} holds {len(candidates)} images ({', '.join(found)}); expected one for "
            f"{platform}. Save just the one you want."
        )
    desc = matching[0][0]
    manifest, raw = blobs.read_json(_blob_path(desc["digest"]), desc["digest"])
    return _from_manifest(path, blobs, manifest, "oci", f"sha256:{hashlib.sha256(raw).hexdigest()}")


def _from_manifest(path: Path, blobs: _Blobs, manifest, kind: str, identity: str) -> OciImage:
    try:
        cdesc = manifest["config"]
        config, _ = blobs.read_json(_blob_path(cdesc["digest"]), cdesc["digest"])
        descs = manifest["layers"]
        layers = [Layer(d["digest"], d["digest"], None) for d in descs]
    except (KeyError, TypeError) as e:
        raise OciError(f"{path}: malformed image manifest ({e})") from None
    return _with_diff_ids(path, blobs, kind, identity, config, layers)


def _open_docker_save(path: Path, blobs: _Blobs) -> OciImage:
    entries, _ = blobs.read_json("manifest.json")
    if not isinstance(entries, list) or len(entries) != 1:
        tags = [t for e in entries if isinstance(e, dict) for t in e.get("RepoTags") or []]
        raise OciError(
            f"{path} holds {len(entries) if isinstance(entries, list) else 0} images "
            f"({', '.join(tags) or 'untagged'}); save one image per archive."
        )
    try:
        config, raw = blobs.read_json(entries[0]["Config"])
        layers = [Layer(name, None, None) for name in entries[0]["Layers"]]
    except (KeyError, TypeError) as e:
        raise OciError(f"{path}: malformed manifest.json ({e})") from None
    identity = f"sha256:{hashlib.sha256(raw).hexdigest()}"
    return _with_diff_ids(path, blobs, "docker-save", identity, config, layers)


def _with_diff_ids(path, blobs, kind, identity, config, layers) -> OciImage:
    if not isinstance(config, dict):
        raise OciError(f"{path}: malformed image config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise OciError(
            f"{path}: the config lists {len(diff_ids)} layers, the manifest {len(layers)}"
        )
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        layer.diff_id = diff_id
    return OciImage(path, kind, identity, config, layers, blobs)


# ------------------------------------------------------------------ layers
class _Hashing(io.RawIOBase):
    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        self.sha.update(data)
        b[: len(data)] = data
        return len(data)

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


@dataclass
class UnpackStats:
    layers: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # what was left out, counted
    written: int = 0  # bytes of files unpacked, all layers (capped: max_image_bytes)


def unpack(image: OciImage, dest: Path) -> UnpackStats:
    """Apply ``image``'s layers in order into the existing, empty folder ``dest``. Owners
    are kept when running as root (or under fakeroot)."""
    stats = UnpackStats()
    for i, layer in enumerate(image.layers):
        where = _blob_path(layer.digest) if layer.digest else layer.locator
        what = f"layer {i + 1} of {len(image.layers)} ({layer.locator})"
        with image._blobs.open(where) as raw:
            stored = _Hashing(raw)
            buffered = io.BufferedReader(stored, 1 << 20)
            magic = buffered.peek(4)[:4]
            if magic[:4] == b"\x28\xb5\x2f\xfd":
                raise OciError(
                    f"{what} is zstd-compressed, which is not supported; save the image with "
                    "gzip or no compression (e.g. skopeo copy --dest-compress-format gzip)"
                )
            plain = gzip.GzipFile(fileobj=buffered) if magic[:2] == b"\x1f\x8b" else buffered
            tar_bytes = _Hashing(plain)
            try:
                with tarfile.open(fileobj=tar_bytes, mode="r|") as tf:
                    _apply_layer(tf, dest, stats)
                tar_digest = tar_bytes.drain()
                while buffered.read(1 << 20):
                    pass
            except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
                if layer.digest:  # a damaged blob says so before its contents do
                    _check_digest(stored.drain(), layer.digest, what)
                raise OciError(f"{what} is not a readable tar: {e}") from None
            if layer.digest:
                _check_digest(stored.drain(), layer.digest, what)
            if layer.diff_id:
                _check_digest(tar_digest, layer.diff_id, what)
        stats.layers += 1
    return stats


def resolve_in_root(root: Path, rel: str, follow_last: bool = False) -> Path:
    """``rel`` inside ``root`` as if ``root`` were ``/``: ``..`` stops at it, symlinks on
    the way are read (never followed by the OS) and resolved inside it. The result has no
    symlink among its existing components, but for the last unless ``follow_last``."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, name)
        if (parts or follow_last) and here.is_symlink():
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise OciError(f"too many levels of symbolic links in /{rel}")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(name)
    return root.joinpath(*done)


def remove_entry(path: Path) -> None:
    """Remove a file, link (not what it points to) or folder; nothing if missing."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _apply_layer(tf: tarfile.TarFile, root: Path, stats: UnpackStats) -> None:
    written: set[str] = set()  # what this layer put in place (whiteouts spare it)
    opaque: list[Path] = []
    as_root = os.geteuid() == 0
    for m in tf:
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if not parts:
            continue  # the root folder itself keeps our owner and mode
        parent = resolve_in_root(root, "/".join(parts[:-1]), follow_last=True)
        base = parts[-1]
        if base == ".wh..wh..opq":
            opaque.append(parent)
            continue
        if base.startswith(".wh."):
            victim = parent / base[4:]
            if base[4:] not in ("", "..") and _rel(root, victim) not in written:
                remove_entry(victim)
            continue
        if base == "..":
            continue
        if m.ischr() or m.isblk():
            stats.skipped["device nodes"] = stats.skipped.get("device nodes", 0) + 1
            continue
        if not (m.isdir() or m.isfile() or m.issym() or m.islnk() or m.isfifo()):
            stats.skipped["other entries"] = stats.skipped.get("other entries", 0) + 1
            continue
        try:
            parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise OciError(f"/{m.name}: a parent of it is not a folder in the image") from None
        path = parent / base
        exists = path.is_symlink() or path.exists()
        if m.isdir():
            if exists and (path.is_symlink() or not path.is_dir()):
                remove_entry(path)
                exists = False
            if not exists:
                path.mkdir(mode=0o700)
        else:
            if exists:
                remove_entry(path)
            if m.issym():
                os.symlink(m.linkname, path)
            elif m.islnk():
                source = resolve_in_root(root, m.linkname)
                if source.is_dir() and not source.is_symlink():
                    raise OciError(f"/{m.name} is a hard link to a folder ({m.linkname})")
                try:
                    os.link(source, path, follow_symlinks=False)
                except FileNotFoundError:
                    raise OciError(
                        f"/{m.name} is a hard link to /{m.linkname}, which is not in the image"
                    ) from None
            elif m.isfifo():
                os.mkfifo(path, 0o600)
            else:
                stats.written += m.size
                if stats.written > (cap := max_image_bytes()):
                    raise OciError(
                        f"the image unpacks to over {cap / (1 << 30):.0f} GiB "
                        "(SMOL_KERNEL_MAX_IMAGE_GIB): refusing it before it fills the disk"
                    )
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                with os.fdopen(os.open(path, flags, 0o600), "wb") as out:
                    data = tf.extractfile(m)
                    if data is not None:
                        shutil.copyfileobj(data, out, 1 << 20)
        written.add(_rel(root, path))
        if m.islnk():
            continue  # a hard link shares its source's inode and metadata
        if as_root:
            os.chown(path, m.uid, m.gid, follow_symlinks=False)
        if not m.issym():
            os.chmod(path, stat.S_IMODE(m.mode) | (0o700 if m.isdir() and not as_root else 0))
        os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
    for folder in opaque:
        if folder.is_dir() and not folder.is_symlink():
            _clear_lower(root, folder, written)


def _clear_lower(root: Path, folder: Path, written: set[str]) -> None:
    """Remove from ``folder`` what layers below put there (an opaque whiteout)."""
    for entry in list(folder.iterdir()):
        if _rel(root, entry) not in written:
            remove_entry(entry)
        elif entry.is_dir() and not entry.is_symlink():
            _clear_lower(root, entry, written)
