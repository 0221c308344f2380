"""Image archives made in a test: OCI layouts and ``docker save`` tars from layer tars."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path


def layer(entries: list[tuple], compress: bool = False) -> bytes:
    """A layer tar from (kind, name, arg) entries: file (arg: bytes, then optionally
    owner uid and mode), dir, symlink and hardlink (arg: target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, *arg in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if kind == "file":
                ti.size, ti.mode = len(arg[0]), 0o644
                if len(arg) > 1:
                    ti.uid = ti.gid = arg[1]
                    ti.mode = arg[2]
                tf.addfile(ti, io.BytesIO(arg[0]))
                continue
            ti.type, ti.mode = {
                "dir": (tarfile.DIRTYPE, 0o755),
                "symlink": (tarfile.SYMTYPE, 0o777),
                "hardlink": (tarfile.LNKTYPE, 0o644),
            }[kind]
            if arg:
                ti.linkname = arg[0]
            tf.addfile(ti)
    data = buf.getvalue()
    return gzip.compress(data, 1) if compress else data


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(layers: list[bytes], arch: str = "amd64") -> bytes:
    diff_ids = [sha(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b) for b in layers]
    return json.dumps({"os": "linux", "architecture": arch, "config": {},
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()  # fmt: skip


def oci_layout(root: Path, layers: list[bytes], arch: str = "amd64") -> Path:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        (blobs / sha(data)[7:]).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    config = blob(config_for(layers, arch))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar"
                    + ("+gzip" if b[:2] == b"\x1f\x8b" else ""), **blob(b)} for b in layers],
    }).encode()  # fmt: skip
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(manifest),
            "platform": {"os": "linux", "architecture": arch}}  # fmt: skip
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return root


def docker_save(path: Path, layers: list[bytes]) -> Path:
    with tarfile.open(path, "w") as tf:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        names = []
        for i, data in enumerate(layers):
            names.append(f"layer{i}/layer.tar")
            add(names[-1], data)
        config = config_for(layers)
        add("config.json", config)
        add("manifest.json", json.dumps([{"Config": "config.json", "RepoTags": ["t:1"],
                                          "Layers": names}]).encode())  # fmt: skip
    return path
