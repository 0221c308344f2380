"""`%pip install` in a kernel with no network (the host resolves, fetches and hands the
wheels over) against a local `pip install` of the same package into a host venv, in the
same run, from the same local index (tests/package_index.py: a package and its dependency).

Usage: python benchmarks/packages.py [--runs 5]   (needs the default guest image)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smol_kernel.sandbox import AsyncSandbox  # noqa: E402
from tests.package_index import serve_index, standard_index  # noqa: E402


def local_pip(url: str, venv: Path) -> float:
    target = tempfile.mkdtemp(prefix="bench-pip-")
    t0 = time.monotonic()
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    "--no-cache-dir", "--index-url", url, "--target", target, "smol-top"],
                   check=True)  # fmt: skip
    return time.monotonic() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-packages-"))
    standard_index(work / "index", work / "mark")
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
    with serve_index(work / "index") as url:
        local = [local_pip(url, work / "venv") for _ in range(args.runs)]
        vm = []
        async with AsyncSandbox(package_index_url=url, max_installs_per_minute=1000) as sb:
            for _ in range(args.runs):
                t0 = time.monotonic()
                ex = await sb.run_code("%pip install smol-top")
                assert ex.status == "ok", ex.logs
                vm.append(time.monotonic() - t0)
    for name, times in (("%pip install in the VM", vm), ("local pip install", local)):
        print(f"{name:<24} min {min(times):.2f}s  median {statistics.median(times):.2f}s  "
              f"max {max(times):.2f}s")  # fmt: skip
    print(f"ratio (medians): {statistics.median(vm) / statistics.median(local):.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
