"""What the output policy costs: the same local ipykernel reached three ways in one run --
directly, through the byte relay (the relay before the policy: ``KernelRelay`` without a
gate), and through the relay with the output policy and iopub backlog (what every smolvm
kernel gets). No VM: only the host-side cost is measured.

Figures (min / median / max over --runs; each run alternates the three paths):
* execute round trip of ``1+1`` (median of 30)
* a cell that prints 50 MB (in 1 MiB stream messages, as our guest kernel sends them)
* a cell that displays a 2 MB HTML table (rewritten by the policy)

Usage: python benchmarks/output_policy.py [--runs 5]
Target: the policy costs at most 10% on the round trip over the byte relay.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smol_kernel.guest.protocol import CHANNEL_PORTS
from smol_kernel.ioloop import on_io_loop
from smol_kernel.relay import KernelRelay
from smol_kernel.relay.message_pump import MessageGate
from smol_kernel.relay.output_policy import OutputPolicy

BIG_PRINT = (
    "import sys\nfor i in range(50):\n    sys.stdout.write('x' * 1_000_000); sys.stdout.flush()"
)
BIG_HTML = (
    "from IPython.display import HTML, display\n"
    "display(HTML('<table>' + '<tr><td>1</td><td>2</td></tr>' * 70_000 + '</table>'))"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def relay_to(info: dict, gate: MessageGate | None) -> tuple[KernelRelay, dict]:
    """A relay on fresh host ports in front of the kernel's own ports."""
    by_vport = {CHANNEL_PORTS[ch]: int(info[f"{ch}_port"]) for ch in CHANNEL_PORTS}
    ports = {ch: free_port() for ch in CHANNEL_PORTS}
    relay = KernelRelay("tcp", "127.0.0.1", ports, gate)

    async def open_stream(vport: int, timeout: float = 5.0):
        return await asyncio.open_connection("127.0.0.1", by_vport[vport], limit=1 << 20)

    async def serve() -> None:
        relay.bind()
        await relay.start_serving(open_stream)

    await on_io_loop(serve())
    return relay, {f"{ch}_port": p for ch, p in ports.items()}


async def timed(kc, code: str, n: int = 1) -> float:
    times = []
    for _ in range(n + (2 if n > 1 else 0)):
        t0 = time.monotonic()
        reply = await kc.execute_interactive(code, timeout=300, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        times.append(time.monotonic() - t0)
    return statistics.median(times[2:] if n > 1 else times)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel()
    info = km.get_connection_info()
    figures: dict[str, dict[str, list[float]]] = {}
    try:
        paths = {"direct": None, "byte relay": False, "policy relay": True}
        for run in range(args.runs):
            for name, policy in paths.items():
                relay, ports = (None, {}) if policy is None else await relay_to(info, MessageGate(
                    key=info["key"], signature_scheme=info["signature_scheme"],
                    policy=OutputPolicy()) if policy else None)  # fmt: skip
                kc = km.client(**ports)
                kc.start_channels()
                try:
                    await kc.wait_for_ready(timeout=60)
                    for metric, code, n in (("execute round trip", "1+1", 30),
                                            ("print 50 MB", BIG_PRINT, 1),
                                            ("display 2 MB HTML", BIG_HTML, 1)):  # fmt: skip
                        figures.setdefault(metric, {}).setdefault(name, []).append(
                            await timed(kc, code, n)
                        )
                finally:
                    kc.stop_channels()
                    if relay is not None:
                        await on_io_loop(relay.close())
            print(f"run {run + 1}/{args.runs} done", flush=True)
    finally:
        await km.shutdown_kernel(now=True)
    print(
        f"\n{'figure':<22} {'path':<13} {'min':>8} {'median':>8} {'max':>8}  "
        "vs byte relay  vs direct"
    )
    for metric, by_path in figures.items():
        base = statistics.median(by_path["byte relay"])
        direct = statistics.median(by_path["direct"])
        for name, xs in by_path.items():
            med = statistics.median(xs)
            print(f"{metric:<22} {name:<13} {min(xs):>7.4f}s {med:>7.4f}s {max(xs):>7.4f}s  "
                  f"{med / base:>12.2f}x {med / direct:>9.2f}x")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
