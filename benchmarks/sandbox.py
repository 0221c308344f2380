"""What an AI tool waits for: creating a sandbox and a ``run_code("1+1")`` round trip,
each as a ratio to a local ipykernel (start -> ready; execute round trip) in the same run.

Figures (min / median / max over --runs):
* create (cold)  ``await AsyncSandbox.create(pool_size=0)`` -> ready
* create (warm)  the same with a prepared VM waiting in the warm pool
* run_code       ``run_code("1+1")`` round trip, median of 20 per run
* local          a local ipykernel: start -> kernel_info reply; execute round trip

Usage: python benchmarks/sandbox.py [--runs 3]   (needs the default guest image)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import execute_rtt, start, stats, stop

from smol_kernel.ioloop import on_io_loop
from smol_kernel.pool import wait_for_pool, warm_pool
from smol_kernel.sandbox import AsyncSandbox, fill_sandbox_pool


async def run_code_rtt(sandbox: AsyncSandbox, n: int = 20) -> float:
    times = []
    for _ in range(n + 2):
        t0 = time.monotonic()
        ex = await sandbox.run_code("1+1")
        assert ex.text == "2", ex
        times.append(time.monotonic() - t0)
    return statistics.median(times[2:])  # the first two warm the path up


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--local-kernel", default="python3")
    args = ap.parse_args()
    fig: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        fig.setdefault(name, []).append(value)

    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", flush=True)
        km, kc, t = await start(args.local_kernel)
        add("local start", t)
        add("local execute", await execute_rtt(kc))
        await stop(km, kc)

        t0 = time.monotonic()
        sandbox = await AsyncSandbox.create(pool_size=0)
        add("create (cold)", time.monotonic() - t0)
        add("run_code", await run_code_rtt(sandbox))
        await sandbox.kill()

        await fill_sandbox_pool(pool_size=1)
        await wait_for_pool(lambda pool: pool.ready_count() >= 1)
        t0 = time.monotonic()
        sandbox = await AsyncSandbox.create(pool_size=1)
        add("create (warm)", time.monotonic() - t0)
        assert sandbox.provisioner.start_kind == "pooled"
        await sandbox.kill()
        await on_io_loop(warm_pool().close())

    S = {k: stats(v) for k, v in fig.items()}
    rows = [("create (cold)", "local start"), ("create (warm)", "local start"),
            ("run_code", "local execute"), ("local start", "local start"),
            ("local execute", "local execute")]  # fmt: skip
    print(f"\n{'figure':<16} {'min':>9} {'median':>9} {'max':>9}   ratio to local")
    for name, base in rows:
        s = S[name]
        ratio = s["median"] / S[base]["median"]
        print(f"{name:<16} {s['min']:>8.3f}s {s['median']:>8.3f}s {s['max']:>8.3f}s   "
              f"{ratio:>6.2f}x")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
