"""A local package index for tests: wheels made by hand (no build tool runs), an sdist whose
setup.py would leave a mark if anything ever ran it, served as a PEP 503 simple index."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import os
import tarfile
import threading
import zipfile
from pathlib import Path


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes | str],
               requires: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A pure-Python wheel of ``files`` (path -> content) with a valid RECORD."""
    dist = f"{name.replace('-', '_')}-{version}"
    content = {path: data.encode() if isinstance(data, str) else data
               for path, data in files.items()}  # fmt: skip
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    content[f"{dist}.dist-info/METADATA"] = meta.encode()
    content[f"{dist}.dist-info/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: smol-kernel-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    record = []
    for path, data in content.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    content[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in content.items():
            z.writestr(member, data)
    return path


def make_sdist(folder: Path, name: str, version: str, mark: Path) -> Path:
    """An sdist whose setup.py writes ``mark``: building it anywhere leaves the mark."""
    base = f"{name.replace('-', '_')}-{version}"
    setup = (f"open({str(mark)!r}, 'w').write('built')\nfrom setuptools import setup\n"
             f"setup(name={name!r}, version={version!r})\n")  # fmt: skip
    path = folder / f"{base}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member, text in {"setup.py": setup, "PKG-INFO": f"Name: {name}\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{base}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_index(root: Path) -> None:
    """``root/simple/NAME/index.html`` for every file in ``root/files``, with its sha256."""
    by_name: dict[str, list[Path]] = {}
    for f in sorted((root / "files").iterdir()):
        name = f.name.split("-")[0].replace("_", "-").lower()
        by_name.setdefault(name, []).append(f)
    for name, files in by_name.items():
        page = root / "simple" / name
        page.mkdir(parents=True, exist_ok=True)
        links = "".join(
            f'<a href="../../files/{f.name}#sha256={hashlib.sha256(f.read_bytes()).hexdigest()}">'
            f"{f.name}</a>\n" for f in files
        )  # fmt: skip
        (page / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")


@contextlib.contextmanager
def serve_index(root: Path, host: str = "127.0.0.1"):
    """Serve ``root`` over HTTP; yields the simple index's URL. Records every path asked."""
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://{host}:{server.server_address[1]}/simple/"
        serve_index.asked = asked  # type: ignore[attr-defined]
        yield url
    finally:
        server.shutdown()
        server.server_close()


def standard_index(root: Path, mark: Path) -> Path:
    """The suite's index: smol-top (needs smol-dep), smol-dep, smol-src (sdist only),
    smol-big (a 3 MiB wheel)."""
    files = root / "files"
    files.mkdir(parents=True)
    make_wheel(files, "smol-dep", "1.0", {"smol_dep/__init__.py": "VALUE = 41\n"})
    make_wheel(files, "smol-top", "2.0",
               {"smol_top/__init__.py": "from smol_dep import VALUE\nANSWER = VALUE + 1\n"},
               requires=("smol-dep>=1",))  # fmt: skip
    make_sdist(files, "smol-src", "1.0", mark)
    make_wheel(files, "smol-big", "1.0", {"smol_big/blob.bin": os.urandom(3 << 20)})
    write_index(root)
    return root


@contextlib.contextmanager
def served_standard_index(root: Path):
    """The suite's index in ``root``, served: yields (its URL, the mark the sdist leaves
    if anything ever builds it)."""
    mark = root / "sdist-was-built"
    standard_index(root, mark)
    with serve_index(root) as url:
        yield url, mark
