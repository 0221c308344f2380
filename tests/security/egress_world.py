"""The test "internet" the egress tests share: a network namespace (``netns.py``) running
``egress_services.py`` -- DNS for allowed.test, api.allowed.test and blocked.test, HTTP,
a TLS recorder, line-protocol recorders, a package index with one wheel and pip itself."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .netns import outside_network

SERVICES = Path(__file__).with_name("egress_services.py")


def build_index(root: Path) -> None:
    """A package index with one tiny wheel, and pip itself as a zip (the image has no pip:
    ``python pip.zip/pip`` runs it, as pip's own docs do with a wheel)."""
    import pip

    wheel = root / "smoltiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("smoltiny.py", "VALUE = 42\n")
        z.writestr("smoltiny-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: smoltiny\nVersion: 1.0\n")  # fmt: skip
        z.writestr("smoltiny-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")  # fmt: skip
        z.writestr("smoltiny-1.0.dist-info/RECORD", "")
    simple = root / "simple" / "smoltiny"
    simple.mkdir(parents=True)
    (simple / "index.html").write_text(f'<a href="../../{wheel.name}">{wheel.name}</a>\n')
    pip_dir = Path(pip.__file__).parent
    with zipfile.ZipFile(root / "pip.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for f in pip_dir.rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts:
                z.write(f, "pip/" + str(f.relative_to(pip_dir)))


@contextlib.contextmanager
def outside_world(files: Path) -> Iterator[dict]:
    """Addresses: allowed, blocked, api (api.allowed.test), cidr (no name)."""
    build_index(files)
    os.chmod(files, 0o755)

    def services(addrs: list[str]) -> list[str]:
        names = [f"allowed.test={addrs[0]}", f"blocked.test={addrs[1]}",
                 f"api.allowed.test={addrs[2]}"]  # fmt: skip
        return [sys.executable, str(SERVICES), str(files), addrs[0], *names]

    with outside_network("smolegr", 204, 4, services) as addrs:
        yield {"allowed": addrs[0], "blocked": addrs[1], "api": addrs[2], "cidr": addrs[3]}


def fetch(world: dict, path: str):
    """GET ``path`` from the world's HTTP server, from the host (no proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return json.loads(opener.open(f"http://{world['allowed']}:8080{path}", timeout=10).read())
