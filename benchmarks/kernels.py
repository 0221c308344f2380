"""Every speed and memory figure of smolvm kernels, each as a ratio to a local ipykernel
measured in the same run (machines drift; ratios within one run hold).

Figures (min / median / max over --runs):
* first start   start_kernel -> kernel_info for a configuration never started before: boots
                and saves its template, then restores a clone (once per configuration)
* clone start   the same with the template there: --starts starts in a row, no pool
* pooled start  the same with a restored clone waiting in the warm pool
* cold start    a kernel that cannot be cloned (it starts in a share): a full boot
* restart       restart_kernel -> kernel_info (a new clone)
* 5 at once     five kernels started together: until all five answered kernel_info
* first result  start_kernel -> the first cell's result (``1+1``), what a user waits for
                (the second clone start of a run: the first one measures kernel_info)
* first kernel_info / first traceback in a fresh clone (TCG translates code paths anew)
* execute       round trip of a trivial cell (``1+1``), median of 20 per run
* relay         the same round trip to a *local* kernel through our host relay (output
                policy included) and the guest agent's bridge, vs directly
* idle PSS / private memory of one idle kernel (its VMM and helpers, or the local
                process), and the template files (shared by every clone)
* idle CPU      host CPU of one idle kernel over 10 s, % of one core
* density       N idle kernels at once: total PSS plus template files, private memory per
                kernel, idle CPU, and how long until all N answered an execute

Usage: python benchmarks/kernels.py [--runs 3] [--starts 10] [--density 10] [--chart F.png]
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
from smol_kernel.relay import KernelRelay  # noqa: E402
from smol_kernel.relay.message_pump import MessageGate  # noqa: E402
from smol_kernel.relay.output_policy import OutputPolicy  # noqa: E402
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


def mem_kib(pids: list[int], fields: tuple[str, ...] = ("Pss:",)) -> int:
    """Sum of smaps_rollup ``fields`` over ``pids`` (Pss: shared pages split fairly;
    Private_Clean + Private_Dirty: what this process alone holds)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(fields):
                    total += int(line.split()[1])
    return total


PRIVATE = ("Private_Clean:", "Private_Dirty:")


def template_kib() -> int:
    """What the templates on disk hold (their RAM files are the clones' shared memory)."""
    folder = Path(os.environ["SMOL_KERNEL_TEMPLATES_DIR"])
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file()) >> 10


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
async def start(name: str, cwd: str | None = None) -> tuple[AsyncKernelManager, object, float]:
    km = AsyncKernelManager(kernel_name=name)
    t0 = time.monotonic()
    await km.start_kernel(**({"cwd": cwd} if cwd else {}))
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
    """(direct, through relay + bridge) execute round trips to one local kernel; the
    relay applies the output policy, as for every smolvm kernel."""
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
        gate = MessageGate(key=info["key"], signature_scheme=info["signature_scheme"],
                           policy=OutputPolicy())  # fmt: skip
        relay = KernelRelay("tcp", "127.0.0.1", host_ports, gate)

        async def serve() -> None:
            relay.bind()
            await relay.start_serving(bridge.open_stream)

        await on_io_loop(serve())
        kc2 = km.client(**{f"{ch}_port": p for ch, p in host_ports.items()})
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


async def density(smol: str, local: str, n: int) -> dict:
    """N idle kernels of each kind: memory (PSS of every process, plus template files for
    smolvm), private memory per kernel, idle CPU, and all N answering an execute."""
    out = {}
    for which, name in (("local", local), ("smolvm", smol)):
        kernels = []
        try:
            while len(kernels) < n:
                km, kc, _ = await start(name)
                kernels.append((km, kc))
            await asyncio.sleep(5)  # settle
            pids = [p for km, _ in kernels for p in pids_of(km)]
            t0 = time.monotonic()
            await asyncio.gather(*(kc.execute_interactive(
                "sum(range(1000))", timeout=120, output_hook=lambda m: None)
                for _, kc in kernels))  # fmt: skip
            files = template_kib() if which == "smolvm" else 0
            out[which] = {
                "n": n,
                "pss_mib": (mem_kib(pids) + files) / 1024,
                "template_mib": files / 1024,
                "private_mib_each": mem_kib(pids, PRIVATE) / 1024 / n,
                "idle_cpu_pct": await idle_cpu_percent(pids, 10),
                "all_answered_s": time.monotonic() - t0,
            }
            print(f"  density {which} N={n}: {out[which]}", flush=True)
        finally:
            await asyncio.gather(*(stop(km, kc) for km, kc in kernels))
    return out


async def timed_cell(kc, code: str) -> float:
    t0 = time.monotonic()
    await kc.execute_interactive(code, timeout=120, output_hook=lambda m: None)
    return time.monotonic() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--starts", type=int, default=10, help="clone starts in a row per run")
    ap.add_argument("--kernel", default="smolvm-bench", help="kernelspec installed for this run")
    ap.add_argument("--local-kernel", default="python3")
    ap.add_argument("--density", type=int, default=10, help="idle kernels at once, 0 to skip")
    ap.add_argument("--chart", default=str(ROOT / "benchmarks" / "kernels.png"))
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from smol_kernel.cli import main as cli

    prefix = tempfile.mkdtemp(prefix="smol-bench-prefix-")
    atexit.register(shutil.rmtree, prefix, True)  # the run's kernelspecs and templates
    os.environ["JUPYTER_PATH"] = f"{prefix}/share/jupyter"
    names = {k: f"{args.kernel}-{k}" for k in ("clone", "pooled", "cold")}
    for kind, extra in (("clone", ["--pool-size", "0"]), ("pooled", ["--pool-size", "1"]),
                        ("cold", ["--pool-size", "0", "--share-cwd", "ro"])):  # fmt: skip
        cli(["install", "--prefix", prefix, "--name", names[kind], "--no-server-extension",
             *extra])  # fmt: skip
    workdir = tempfile.mkdtemp(prefix="smol-bench-cwd-")
    atexit.register(shutil.rmtree, workdir, True)

    fig: dict[str, dict[str, list[float]]] = {}

    def add(metric: str, which: str, value: float) -> None:
        fig.setdefault(metric, {}).setdefault(which, []).append(value)

    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", flush=True)
        # A fresh template folder per run: the first start builds the template.
        os.environ["SMOL_KERNEL_TEMPLATES_DIR"] = tempfile.mkdtemp(dir=prefix)
        km, kc, t = await start(args.local_kernel)
        add("start_s", "local", t)
        add("first_result_s", "local", t + await timed_cell(kc, "1+1"))
        add("execute_s", "local", await execute_rtt(kc))
        add("first_traceback_s", "local", await timed_cell(kc, "1/0"))
        pids = pids_of(km)
        add("idle_cpu_pct", "local", await idle_cpu_percent(pids))
        add("idle_pss_mib", "local", mem_kib(pids) / 1024)
        add("idle_private_mib", "local", mem_kib(pids, PRIVATE) / 1024)
        t0 = time.monotonic()
        await km.restart_kernel(now=False)
        await kc.wait_for_ready(timeout=60)
        add("restart_s", "local", time.monotonic() - t0)
        await stop(km, kc)

        km, kc, t = await start(names["clone"])
        assert km.provisioner.start_kind == "clone", km.provisioner.start_kind
        add("start_s", "first (template build)", t)
        await stop(km, kc)
        starts = []
        for _ in range(args.starts):
            km, kc, t = await start(names["clone"])
            assert km.provisioner.start_kind == "clone"
            starts.append(t)
            if len(starts) == 2:
                add("first_result_s", "smolvm", t + await timed_cell(kc, "1+1"))
            if len(starts) == 1:
                t0 = time.monotonic()
                await kc.kernel_info(reply=True)
                add("first_kernel_info_s", "smolvm", time.monotonic() - t0)
                add("first_traceback_s", "smolvm", await timed_cell(kc, "1/0"))
                add("execute_s", "smolvm", await execute_rtt(kc))
                await asyncio.sleep(2)
                pids = pids_of(km)
                add("idle_cpu_pct", "smolvm", await idle_cpu_percent(pids))
                add("idle_pss_mib", "smolvm", mem_kib(pids) / 1024)
                add("idle_private_mib", "smolvm", mem_kib(pids, PRIVATE) / 1024)
                t0 = time.monotonic()
                await km.restart_kernel(now=False)
                await kc.wait_for_ready(timeout=60)
                add("restart_s", "smolvm", time.monotonic() - t0)
            await stop(km, kc)
        add("start_s", "clone (median)", statistics.median(starts))
        add("start_s", "clone (worst)", max(starts))
        add("template_mib", "smolvm", template_kib() / 1024)

        t0 = time.monotonic()
        five = await asyncio.gather(*(start(names["clone"]) for _ in range(5)))
        add("five_at_once_s", "smolvm", time.monotonic() - t0)
        await asyncio.gather(*(stop(km, kc) for km, kc, _ in five))

        await fill_pool(names["pooled"])
        km, kc, t = await start(names["pooled"])
        assert km.provisioner.start_kind == "pooled", km.provisioner.start_kind
        add("start_s", "pooled", t)
        await stop(km, kc)
        await on_io_loop(warm_pool().close())

        km, kc, t = await start(names["cold"], cwd=workdir)
        assert km.provisioner.start_kind == "cold", km.provisioner.start_kind
        add("start_s", "cold (not cloneable)", t)
        await stop(km, kc)

        direct, relayed = await relay_only_rtt(args.local_kernel)
        add("relay_s", "direct", direct)
        add("relay_s", "relayed", relayed)
        print("  " + json.dumps({m: {w: round(v[-1], 4) for w, v in d.items()}
                                 for m, d in fig.items()}), flush=True)  # fmt: skip

    dens = await density(names["clone"], args.local_kernel, args.density) if args.density else {}
    report(fig, dens, args.chart)
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": fig, "density": dens}, indent=1))


def report(fig: dict, dens: dict, chart: str | None) -> None:
    S = {m: {w: stats(v) for w, v in d.items()} for m, d in fig.items()}
    local = {m: S[m]["local"]["median"] for m in S if "local" in S[m]}
    rows = [
        ("first start (template build)", S["start_s"]["first (template build)"], "s",
         local["start_s"], "reported"),
        ("clone start, median", S["start_s"]["clone (median)"], "s", local["start_s"],
         "<= 0.5x"),
        ("clone start, worst", S["start_s"]["clone (worst)"], "s", local["start_s"], "<= 1.0x"),
        ("pooled start", S["start_s"]["pooled"], "s", local["start_s"], "<= 0.5x"),
        ("cold start (not cloneable)", S["start_s"]["cold (not cloneable)"], "s",
         local["start_s"], "reported"),
        ("local ipykernel start", S["start_s"]["local"], "s", local["start_s"], "baseline"),
        ("restart", S["restart_s"]["smolvm"], "s", local["start_s"], "<= 0.5x local start"),
        ("local restart", S["restart_s"]["local"], "s", local["start_s"], "reported"),
        ("5 started at once", S["five_at_once_s"]["smolvm"], "s", local["start_s"], "<= 1.5 s"),
        ("start -> first result (VM)", S["first_result_s"]["smolvm"], "s",
         local["first_result_s"], "reported"),
        ("start -> first result (local)", S["first_result_s"]["local"], "s",
         local["first_result_s"], "baseline"),
        ("first kernel_info (clone)", S["first_kernel_info_s"]["smolvm"], "s",
         local["execute_s"], "reported"),
        ("first traceback (clone)", S["first_traceback_s"]["smolvm"], "s",
         local["first_traceback_s"], "reported"),
        ("execute round trip (VM)", S["execute_s"]["smolvm"], "s", local["execute_s"],
         "no worse than before"),
        ("execute round trip (local)", S["execute_s"]["local"], "s", local["execute_s"],
         "baseline"),
        ("relay + bridge, no VM", S["relay_s"]["relayed"], "s", S["relay_s"]["direct"]["median"],
         "<= 1.2x"),
        ("idle PSS (VM)", S["idle_pss_mib"]["smolvm"], "MiB", local["idle_pss_mib"], "reported"),
        ("idle private (VM)", S["idle_private_mib"]["smolvm"], "MiB",
         local["idle_private_mib"], "<= 100 MiB"),
        ("idle PSS (local)", S["idle_pss_mib"]["local"], "MiB", local["idle_pss_mib"],
         "baseline"),
        ("template files", S["template_mib"]["smolvm"], "MiB", local["idle_pss_mib"],
         "reported"),
        # an idle local kernel often measures 0 ticks: compare against 0.1% at least
        ("idle CPU (VM)", S["idle_cpu_pct"]["smolvm"], "%",
         max(0.1, local["idle_cpu_pct"]), "<= 2%"),
        ("idle CPU (local)", S["idle_cpu_pct"]["local"], "%",
         max(0.1, local["idle_cpu_pct"]), "baseline"),
    ]  # fmt: skip
    print(f"\n{'figure':<30} {'min':>9} {'median':>9} {'max':>9}   {'ratio to local':>14}  target")
    ratios = []
    for label, s, unit, base, target in rows:
        ratio = s["median"] / base if base else float("inf")
        ratios.append((label, ratio))
        print(f"{label:<30} {s['min']:>8.3f}{unit[0]} {s['median']:>8.3f}{unit[0]} "
              f"{s['max']:>8.3f}{unit[0]}   {ratio:>13.2f}x  {target}")  # fmt: skip
    for which, d in dens.items():
        print(
            f"density {which:<7} N={d['n']}: PSS {d['pss_mib']:7.0f} MiB in all (templates "
            f"{d['template_mib']:.0f}), private {d['private_mib_each']:5.0f} MiB/kernel, "
            f"idle CPU {d['idle_cpu_pct']:5.1f}%, all answered in {d['all_answered_s']:.2f}s"
        )
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
    shown = [(label, r) for label, r in ratios
             if "local" not in label and "template" not in label]  # fmt: skip
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
    kinds = list(dens)
    ax2.bar(kinds, [dens[k]["pss_mib"] for k in kinds], color=["tab:blue", "tab:green"][
        : len(kinds)])  # fmt: skip
    for x, k in enumerate(kinds):
        ax2.text(x, dens[k]["pss_mib"], f" {dens[k]['pss_mib']:.0f} MiB", ha="center",
                 va="bottom", fontsize=8)  # fmt: skip
    n = next(iter(dens.values()))["n"] if dens else 0
    ax2.set_ylabel(f"host memory of {n} idle kernels (PSS + templates), MiB")
    ax2.set_title("density")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


if __name__ == "__main__":
    asyncio.run(main())
