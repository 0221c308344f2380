"""Every speed and memory figure of smolvm kernels, each as a ratio to a local ipykernel
measured in the same run (machines drift; ratios within one run hold).

Figures (min / median / max over --runs):
* cold start    start_kernel -> kernel_info reply, no warm pool (pool_size 0)
* warm start    the same with a prepared VM waiting in the warm pool
* execute       round trip of a trivial cell (``1+1``), median of 20 per run
* relay only    the same round trip to a *local* kernel through our host relay and the
                guest agent's bridge (no VM): what the transport alone costs
* idle RSS      host memory of one idle kernel (VMM + helpers, or the local process)
* idle CPU      host CPU of one idle kernel over 10 s, % of one core
* density       N idle kernels at once (N = 1, 5, 10): total RSS, total idle CPU, and
                the time until all N answered an execute sent to each at the same time

Usage: python benchmarks/kernels.py [--runs 3] [--density 1,5,10] [--chart FILE.png]
       (needs the default guest image; the chart needs matplotlib: pip install .[bench])
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smol_kernel.guest import agent as guest_agent  # noqa: E402
from smol_kernel.guest.protocol import CHANNEL_PORTS  # noqa: E402
from smol_kernel.ioloop import on_io_loop  # noqa: E402
from smol_kernel.pool import wait_for_pool, warm_pool  # noqa: E402
from smol_kernel.relay import VsockRelay  # noqa: E402
from smol_kernel.server_extension import warm_kernelspec  # noqa: E402
from smol_kernel.vm.process import list_vms, vm_processes  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- process accounting
def pids_of(km: AsyncKernelManager) -> list[int]:
    prov = km.provisioner
    vm = getattr(prov, "vm", None)
    if vm is None:
        return [prov.pid] if getattr(prov, "pid", None) else []
    for rt, state in list_vms():
        if rt.id == vm.id:
            return vm_processes(rt, state)
    return []


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    total += int(line.split()[1])
    return total


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


async def idle_cpu_percent(pids: list[int], seconds: float = 10.0) -> float:
    t0, c0 = time.monotonic(), cpu_ticks(pids)
    await asyncio.sleep(seconds)
    return 100.0 * (cpu_ticks(pids) - c0) / CLK / (time.monotonic() - t0)


# ---------------------------------------------------------------- kernels
async def start(name: str) -> tuple[AsyncKernelManager, object, float]:
    km = AsyncKernelManager(kernel_name=name)
    t0 = time.monotonic()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=300)
    return km, kc, time.monotonic() - t0


async def stop(km, kc) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=False)


async def execute_rtt(kc, n: int = 20) -> float:
    times = []
    for _ in range(n + 2):
        t0 = time.monotonic()
        reply = await kc.execute_interactive("1+1", timeout=60, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok"
        times.append(time.monotonic() - t0)
    return statistics.median(times[2:])  # the first two warm the path up


async def fill_pool(name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(name)
    print(f"  warm pool: {await warm_kernelspec(spec)}", flush=True)
    await wait_for_pool(lambda pool: pool.ready_count() >= 1)


# ---------------------------------------------------------------- relay only
class BridgeWithoutVm:
    """The host relay and the guest agent's bridge in front of a local kernel: the path a
    VM kernel's messages take, minus vhost-user-vsock and the emulated guest."""

    def __init__(self, kernel_ports: dict[str, int]) -> None:
        self.dir = tempfile.mkdtemp(prefix="smol-bench-")
        self._listeners = []
        for ch, vport in CHANNEL_PORTS.items():
            path = f"{self.dir}/{vport}"
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lsock.bind(path)
            lsock.listen(16)
            self._listeners.append(lsock)
            threading.Thread(
                target=self._accept, args=(lsock, kernel_ports[ch]), daemon=True
            ).start()

    @staticmethod
    def _accept(lsock: socket.socket, kport: int) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = lsock.accept()
                threading.Thread(
                    target=guest_agent._bridge, args=(conn, kport), daemon=True
                ).start()

    async def open_stream(self, vport: int, timeout: float = 5.0):
        return await asyncio.open_unix_connection(f"{self.dir}/{vport}")

    def close(self) -> None:
        import shutil

        for s in self._listeners:
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def relay_only_rtt(local_name: str) -> tuple[float, float]:
    """(direct, through relay + bridge) execute round trips to one local kernel."""
    km, kc, _ = await start(local_name)
    try:
        direct = await execute_rtt(kc)
        info = km.get_connection_info()
        ports = {ch: int(info[f"{ch}_port"]) for ch in CHANNEL_PORTS}
        bridge = BridgeWithoutVm(ports)
        host_ports = {}
        for ch in CHANNEL_PORTS:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                host_ports[ch] = s.getsockname()[1]
        relay = VsockRelay("tcp", "127.0.0.1", host_ports)

        async def serve() -> None:
            relay.bind()
            await relay.start_serving(bridge.open_stream)

        await on_io_loop(serve())
        kc2 = km.client()
        kc2.load_connection_info({**info, **{f"{ch}_port": p for ch, p in host_ports.items()}})
        kc2.start_channels()
        try:
            await kc2.wait_for_ready(timeout=60)
            relayed = await execute_rtt(kc2)
        finally:
            kc2.stop_channels()
            await on_io_loop(relay.close())
            bridge.close()
        return direct, relayed
    finally:
        await stop(km, kc)


# ---------------------------------------------------------------- the run
def stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


async def density(smol: str, local: str, counts: list[int]) -> dict:
    out = {}
    for which, name in (("local", local), ("smolvm", smol)):
        kernels = []
        try:
            for n in counts:
                while len(kernels) < n:
                    km, kc, _ = await start(name)
                    kernels.append((km, kc))
                await asyncio.sleep(3)  # settle
                pids = [p for km, _ in kernels for p in pids_of(km)]
                t0 = time.monotonic()
                await asyncio.gather(*(kc.execute_interactive(
                    "sum(range(1000))", timeout=120, output_hook=lambda m: None)
                    for _, kc in kernels))  # fmt: skip
                all_answered = time.monotonic() - t0
                out.setdefault(which, {})[n] = {
                    "rss_mib": rss_kib(pids) / 1024,
                    "idle_cpu_pct": await idle_cpu_percent(pids, 10),
                    "all_answered_s": all_answered,
                }
                print(f"  density {which} N={n}: {out[which][n]}", flush=True)
        finally:
            await asyncio.gather(*(stop(km, kc) for km, kc in kernels))
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kernel", default="smolvm-bench", help="kernelspec installed for this run")
    ap.add_argument("--local-kernel", default="python3")
    ap.add_argument("--density", default="1,5,10", help="kernel counts, '' to skip")
    ap.add_argument("--chart", default=str(ROOT / "benchmarks" / "kernels.png"))
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from smol_kernel.cli import main as cli

    prefix = tempfile.mkdtemp(prefix="smol-bench-prefix-")
    atexit.register(shutil.rmtree, prefix, True)  # the run's kernelspecs
    os.environ["JUPYTER_PATH"] = f"{prefix}/share/jupyter"
    cold_name, warm_name = args.kernel + "-cold", args.kernel + "-warm"
    for name, pool in ((cold_name, "0"), (warm_name, "1")):
        cli(["install", "--prefix", prefix, "--name", name, "--no-server-extension",
             "--pool-size", pool])  # fmt: skip

    fig: dict[str, dict[str, list[float]]] = {}

    def add(metric: str, which: str, value: float) -> None:
        fig.setdefault(metric, {}).setdefault(which, []).append(value)

    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", flush=True)
        km, kc, t = await start(args.local_kernel)
        add("start_s", "local", t)
        add("execute_s", "local", await execute_rtt(kc))
        pids = pids_of(km)
        add("idle_cpu_pct", "local", await idle_cpu_percent(pids))
        add("idle_rss_mib", "local", rss_kib(pids) / 1024)
        await stop(km, kc)

        km, kc, t = await start(cold_name)
        add("start_s", "cold", t)
        add("execute_s", "smolvm", await execute_rtt(kc))
        await asyncio.sleep(2)
        pids = pids_of(km)
        add("idle_cpu_pct", "smolvm", await idle_cpu_percent(pids))
        add("idle_rss_mib", "smolvm", rss_kib(pids) / 1024)
        await stop(km, kc)

        await fill_pool(warm_name)
        km, kc, t = await start(warm_name)
        assert km.provisioner.start_kind == "pooled", km.provisioner.start_kind
        add("start_s", "warm", t)
        await stop(km, kc)
        await on_io_loop(warm_pool().close())

        direct, relayed = await relay_only_rtt(args.local_kernel)
        add("relay_s", "direct", direct)
        add("relay_s", "relayed", relayed)
        print("  " + json.dumps({m: {w: round(v[-1], 4) for w, v in d.items()}
                                 for m, d in fig.items()}), flush=True)  # fmt: skip

    counts = [int(n) for n in args.density.split(",") if n.strip()]
    dens = await density(cold_name, args.local_kernel, counts) if counts else {}
    report(fig, dens, args.chart)
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": fig, "density": dens}, indent=1))


def report(fig: dict, dens: dict, chart: str | None) -> None:
    S = {m: {w: stats(v) for w, v in d.items()} for m, d in fig.items()}
    local_start = S["start_s"]["local"]["median"]
    rows = [
        ("cold start -> kernel_info", S["start_s"]["cold"], "s", local_start, "<= 8 s"),
        ("warm start -> kernel_info", S["start_s"]["warm"], "s", local_start, "<= 0.5x"),
        ("local ipykernel start", S["start_s"]["local"], "s", local_start, "baseline"),
        ("execute round trip (VM)", S["execute_s"]["smolvm"], "s",
         S["execute_s"]["local"]["median"], "<= 10x"),
        ("execute round trip (local)", S["execute_s"]["local"], "s",
         S["execute_s"]["local"]["median"], "baseline"),
        ("relay + bridge, no VM", S["relay_s"]["relayed"], "s",
         S["relay_s"]["direct"]["median"], "<= 1.2x"),
        ("idle RSS (VM)", S["idle_rss_mib"]["smolvm"], "MiB",
         S["idle_rss_mib"]["local"]["median"], "<= 200 MiB"),
        ("idle RSS (local)", S["idle_rss_mib"]["local"], "MiB",
         S["idle_rss_mib"]["local"]["median"], "baseline"),
        # an idle local kernel often measures 0 ticks: compare against 0.1% at least
        ("idle CPU (VM)", S["idle_cpu_pct"]["smolvm"], "%",
         max(0.1, S["idle_cpu_pct"]["local"]["median"]), "<= 2%"),
        ("idle CPU (local)", S["idle_cpu_pct"]["local"], "%",
         max(0.1, S["idle_cpu_pct"]["local"]["median"]), "baseline"),
    ]  # fmt: skip
    print(f"\n{'figure':<28} {'min':>9} {'median':>9} {'max':>9}   {'ratio to local':>14}  target")
    ratios = []
    for label, s, unit, base, target in rows:
        ratio = s["median"] / base if base else float("inf")
        ratios.append((label, ratio))
        print(f"{label:<28} {s['min']:>8.3f}{unit[0]} {s['median']:>8.3f}{unit[0]} "
              f"{s['max']:>8.3f}{unit[0]}   {ratio:>13.2f}x  {target}")  # fmt: skip
    for which, per_n in dens.items():
        for n, d in per_n.items():
            print(f"density {which:<7} N={n:<3}: RSS {d['rss_mib']:7.0f} MiB "
                  f"({d['rss_mib'] / n:5.0f}/kernel), idle CPU {d['idle_cpu_pct']:5.1f}% "
                  f"({d['idle_cpu_pct'] / n:4.2f}/kernel), all {n} answered in "
                  f"{d['all_answered_s']:.2f}s")  # fmt: skip
    if chart:
        write_chart(ratios, dens, chart)


def write_chart(ratios: list[tuple[str, float]], dens: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed (pip install .[bench])")
        return
    shown = [(label, r) for label, r in ratios if "(local)" not in label and "local " not in label]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [label for label, _ in shown]
    values = [r for _, r in shown]
    colors = ["tab:green" if v <= 1 else "tab:orange" if v <= 10 else "tab:red" for v in values]
    ax.barh(labels, values, color=colors)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("ratio to a local ipykernel, same run (log scale; < 1 is faster/smaller)")
    ax.invert_yaxis()
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_title("smolvm kernel vs local ipykernel (TCG host)")
    for which, per_n in dens.items():
        ns = sorted(per_n)
        ax2.plot(ns, [per_n[n]["rss_mib"] for n in ns], marker="o", label=f"{which} RSS MiB")
    ax2.set_xlabel("idle kernels at once")
    ax2.set_ylabel("host RSS, MiB")
    ax2.set_title("density")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


if __name__ == "__main__":
    asyncio.run(main())
