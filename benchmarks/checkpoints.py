"""Checkpoint, rewind and fork of a kernel holding 200 MB of Python data (timeline.py).

Figures (min / median / max over --runs), next to a local ipykernel's start in the same run
(the reference a user feels: "as fast as starting a kernel"):
* checkpoint    provisioner.checkpoint() of the idle kernel: seconds, kernel paused, bytes
                on disk
* rewind        provisioner.rewind() until the same client's next cell (``len(data)``) has
                answered; then every byte is checked (sha256, not timed)
* fork to N     N kernels restored from the checkpoint at once, until all N answered a cell
                that reads the parent's data (checked in full afterwards, not timed)
* idle forks    --idle-forks K: K more forks, started one after another, left idle 5 s:
                the proportional memory (PSS) of their VMMs in all (what the host holds
                for them: pages they share with the parent and each other count once)

Targets (issue 32, restores that map the checkpoint's RAM): rewind <= 0.8 s, fork to 3
<= 1.5 s, for kernels of 200 MB and of 1 GB; 10 idle forks of a 1 GB kernel <= 1.5 GiB.

Usage: python benchmarks/checkpoints.py [--runs 3] [--mb 200] [--forks 3] [--idle-forks K]
       [--json F]  (needs the default guest image)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smol_kernel import checkpoint as store  # noqa: E402

FILL = ("import hashlib, os\ndata = [os.urandom(1 << 20) for _ in range({mb})]\n"
        "digest = hashlib.sha256(b''.join(data)).hexdigest()")  # fmt: skip
ANSWER = "print(len(data))"  # what the timings wait for: the state is there, the kernel answers
CHECK = "print(len(data), hashlib.sha256(b''.join(data)).hexdigest() == digest)"  # after timing


async def start(name: str, **kw) -> tuple[AsyncKernelManager, object, float]:
    km = AsyncKernelManager(kernel_name=name)
    t0 = time.monotonic()
    await km.start_kernel(**kw)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=300)
    return km, kc, time.monotonic() - t0


async def stop(km, kc) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=False)


def pss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


async def cell(kc, code: str, timeout: float = 300) -> str:
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=200, help="MiB of Python data in the kernel")
    ap.add_argument("--forks", type=int, default=3)
    ap.add_argument("--idle-forks", type=int, default=0)
    ap.add_argument("--kernel", default="smolvm-bench-cp")
    ap.add_argument("--local-kernel", default="python3")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from smol_kernel.cli import main as cli

    prefix = tempfile.mkdtemp(prefix="smol-bench-prefix-")
    atexit.register(shutil.rmtree, prefix, True)
    os.environ["JUPYTER_PATH"] = f"{prefix}/share/jupyter"
    os.environ["SMOL_KERNEL_CHECKPOINTS_DIR"] = tempfile.mkdtemp(dir=prefix)
    cli(["install", "--prefix", prefix, "--name", args.kernel, "--no-server-extension",
         "--pool-size", "0", "--memory-mib", str(max(768, args.mb * 3))])  # fmt: skip

    fig: dict[str, list[float]] = {}

    def add(metric: str, value: float) -> None:
        fig.setdefault(metric, []).append(value)

    want = f"{args.mb} True"
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", flush=True)
        km, kc, t = await start(args.local_kernel)
        add("local_start_s", t)
        await stop(km, kc)

        km, kc, _ = await start(args.kernel)
        try:
            await cell(kc, FILL.format(mb=args.mb))
            prov = km.provisioner
            t0 = time.monotonic()
            cp = await prov.checkpoint("bench")
            add("checkpoint_s", time.monotonic() - t0)
            add("paused_s", cp.paused_s)
            add("checkpoint_mib", cp.size_bytes / (1 << 20))

            await cell(kc, "data[0] = b''; digest = 'changed'")
            t0 = time.monotonic()
            await prov.rewind("bench")
            got = (await cell(kc, ANSWER)).strip()
            add("rewind_s", time.monotonic() - t0)
            assert got == str(args.mb), got
            assert (await cell(kc, CHECK)).strip() == want  # every byte came back

            t0 = time.monotonic()
            forks = await asyncio.gather(*(start(args.kernel, restore_from=cp)
                                           for _ in range(args.forks)))  # fmt: skip
            seen = await asyncio.gather(*(cell(fkc, ANSWER) for _, fkc, _ in forks))
            add("fork_s", time.monotonic() - t0)
            assert [s.strip() for s in seen] == [str(args.mb)] * args.forks, seen
            assert (await cell(forks[0][1], CHECK)).strip() == want
            for fkm, fkc, _ in forks:
                await stop(fkm, fkc)
            if args.idle_forks:
                idle = [await start(args.kernel, restore_from=cp) for _ in range(args.idle_forks)]
                await asyncio.sleep(5)
                add("idle_forks_mib", sum(pss_mib(f.provisioner.vm.pid) for f, _, _ in idle))
                for fkm, fkc, _ in idle:
                    await stop(fkm, fkc)
        finally:
            await stop(km, kc)
        assert store.list_checkpoints(km.kernel_id) == [], "checkpoints go with the kernel"

    def row(label: str, key: str, unit: str, target: float | None = None) -> None:
        v = fig[key]
        ratio = f"{statistics.median(v) / statistics.median(fig['local_start_s']):5.2f}x"
        met = target is not None and statistics.median(v) <= target
        verdict = "met" if met else "NOT met"
        goal = "" if target is None else f"  target <= {target:g}{unit}: {verdict}"
        print(f"  {label:<24} {min(v):8.2f} {statistics.median(v):8.2f} {max(v):8.2f} {unit:<4}"
              f" {ratio if unit == 's' else '':>7}{goal}")  # fmt: skip

    print(
        f"\n{args.mb} MiB of Python data, {args.runs} run(s); min / median / max, "
        "and the median as a ratio to a local ipykernel's start"
    )
    row("local ipykernel start", "local_start_s", "s")
    row("checkpoint", "checkpoint_s", "s")
    row("  kernel paused", "paused_s", "s")
    row("  on disk", "checkpoint_mib", "MiB")
    row("rewind (to next answer)", "rewind_s", "s", 0.8)
    row(f"fork to {args.forks}", "fork_s", "s", 1.5)
    if args.idle_forks:
        row(
            f"{args.idle_forks} idle forks, PSS",
            "idle_forks_mib",
            "MiB",
            1536 if args.idle_forks == 10 and args.mb >= 1024 else None,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
