"""Boot and memory benchmark, printed as ratios against a local ipykernel measured in the same run.

Measures, N times each:
* VM cold boot to agent-ready (QEMU start -> the guest agent answers on vsock)
* smolvm kernel start to kernel_info reply (jupyter_client, full provisioner path)
* local ipykernel start to kernel_info reply (the baseline)
* the same VM boot with network=True (passt + its guard: boot overhead and their RSS)
and the host memory of an idle VM: RSS of QEMU + vhost-device-vsock, split into what is
private to the VM (anon + guest RAM) and shared file pages (kernel image, binaries).

Usage: python benchmarks/boot.py [--runs 3] [--kernel smolvm]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from jupyter_client.manager import AsyncKernelManager

from smol_kernel.agent_client import GuestAgent
from smol_kernel.vm.process import list_vms, vm_processes
from smol_kernel.vm.qemu import QemuBackend
from smol_kernel.vm.spec import VmSpec


def _smaps(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1])
    return out


async def vm_boot(backend: QemuBackend, spec: VmSpec) -> tuple[float, dict]:
    t0 = time.monotonic()
    vm = await backend.start(spec)
    agent = await GuestAgent.connect(vm, 120)
    ready = time.monotonic() - t0
    await asyncio.sleep(2)  # idle
    mem = {"rss": 0, "anon": 0, "shmem": 0, "file": 0}
    for rt, state in list_vms():
        if rt.id == vm.id:
            for pid in vm_processes(rt, state):
                s = _smaps(pid)
                mem["rss"] += s.get("Rss", 0)
                mem["anon"] += s.get("Pss_Anon", 0)
                mem["shmem"] += s.get("Pss_Shmem", 0)
                mem["file"] += s.get("Pss_File", 0)
    await agent.close()
    await vm.close()
    return ready, mem


async def kernel_start(name: str) -> tuple[float, int]:
    km = AsyncKernelManager(kernel_name=name)
    t0 = time.monotonic()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=300)
    elapsed = time.monotonic() - t0
    rss = 0
    prov = km.provisioner
    vm = getattr(prov, "vm", None)
    if vm is not None:
        for rt, state in list_vms():
            if rt.id == vm.id:
                rss = sum(_smaps(p).get("Rss", 0) for p in vm_processes(rt, state))
    else:
        pid = getattr(prov, "pid", None)
        if pid:
            rss = _smaps(pid).get("Rss", 0)
    kc.stop_channels()
    await km.shutdown_kernel(now=False)
    return elapsed, rss


def med(xs):
    return statistics.median(xs)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kernel", default="smolvm")
    ap.add_argument("--local-kernel", default="python3")
    args = ap.parse_args()

    backend = QemuBackend()
    status = backend.check()
    print(f"backend qemu, isolation {status.isolation}")
    boots, mems = [], []
    for _ in range(args.runs):
        t, m = await vm_boot(backend, VmSpec())
        boots.append(t)
        mems.append(m)
    net_boots, net_mems = [], []
    for _ in range(args.runs):
        t, m = await vm_boot(backend, VmSpec(network=True))
        net_boots.append(t)
        net_mems.append(m)
    local, local_rss, smol, smol_rss = [], [], [], []
    for _ in range(args.runs):
        t, r = await kernel_start(args.local_kernel)
        local.append(t)
        local_rss.append(r)
        t, r = await kernel_start(args.kernel)
        smol.append(t)
        smol_rss.append(r)

    mib = 1024
    m = {k: med([x[k] for x in mems]) / mib for k in mems[0]}
    print(f"VM cold boot to agent-ready      : median {med(boots):.2f}s  "
          f"(min {min(boots):.2f}, max {max(boots):.2f}; target <= 6 s under TCG)")  # fmt: skip
    print(f"idle VM host RSS (qemu + vhost)  : {m['rss']:.0f} MiB  (target <= 150 MiB)")
    print(f"   private: anon {m['anon']:.0f} MiB + guest RAM touched {m['shmem']:.0f} MiB; "
          f"shared file pages {m['file']:.0f} MiB")  # fmt: skip
    net_rss = med([x["rss"] for x in net_mems]) / mib
    print(f"  with network=True              : boot median {med(net_boots):.2f}s "
          f"({med(net_boots) - med(boots):+.2f}s), RSS {net_rss:.0f} MiB "
          f"({net_rss - m['rss']:+.0f} MiB for passt + guard)")  # fmt: skip
    print(f"local ipykernel start to ready   : median {med(local):.2f}s, RSS "
          f"{med(local_rss) / mib:.0f} MiB")  # fmt: skip
    print(f"smolvm kernel start to ready     : median {med(smol):.2f}s, RSS "
          f"{med(smol_rss) / mib:.0f} MiB")  # fmt: skip
    print(f"ratio smolvm / local: start {med(smol) / med(local):.1f}x, "
          f"memory {med(smol_rss) / max(1, med(local_rss)):.1f}x")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
