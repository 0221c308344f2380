"""What each way of giving a guest network costs the host, in one run: the egress proxy
(``allow_hosts``), plain passt and its guard (``network=True``), and -- with ``--old-tree`` --
the passt-based allow-list guard of an older checkout.

No VM: the guest is a network namespace behind a TAP device (a real Linux TCP stack,
tests/security/guest_netns.py) whose frames go to the helpers exactly as a VM's would, and
the "internet" is the test services in another namespace (tests/security/egress_world.py).
Needs root, iproute2 and passt.

Figures (median of --runs), per path:
* download   MB/s of a 50 MB HTTP download from an allowed name
* refuse     seconds until a connection to an address not allowed is refused (with the
             network simply on nothing is refused: the connection is made)
* first byte seconds from connect() to the first byte of a small HTTP answer
* CPU/MB     host CPU seconds (the helper processes: proxy, or passt and its guard) per MB
             downloaded

With ``--vm`` the same figures from a kernel's VM as well (the proxy and plain passt of this
tree; under TCG the guest's own speed weighs on them).

Usage: sudo python benchmarks/egress.py [--runs 3] [--old-tree PATH] [--vm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.security.egress_world import outside_world  # noqa: E402
from tests.security.guest_netns import tap_guest  # noqa: E402

SIZE = 50_000_000
GUEST_CODE = """
import json, socket, statistics, time
def download():
    s = socket.create_connection(("allowed.test", 8080), 20)
    t = time.monotonic()
    s.sendall(b"GET /big?n=%(size)d HTTP/1.1\\r\\nHost: allowed.test:8080\\r\\n\\r\\n")
    got = 0
    while got < %(size)d:
        d = s.recv(1 << 20)
        if not d:
            break
        got += len(d)
    return time.monotonic() - t
def refuse():
    t = time.monotonic()
    try:
        socket.create_connection(("%(blocked)s", 8080), 20)
    except OSError:
        pass
    return time.monotonic() - t
def first_byte():
    t = time.monotonic()
    s = socket.create_connection(("allowed.test", 8080), 20)
    s.sendall(b"GET /marker HTTP/1.1\\r\\nHost: allowed.test:8080\\r\\n\\r\\n")
    s.recv(1)
    return time.monotonic() - t
socket.gethostbyname("allowed.test")
print(json.dumps({"refuse": statistics.median(refuse() for _ in range(10)),
                  "first_byte": statistics.median(first_byte() for _ in range(10)),
                  "download": download()}))
"""
# Started in a child per path: the network helpers of the tree named (this one, or
# --old-tree), spliced to the guest's link (both sides speak the same framing).
STARTER = """
import json, socket, sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from smol_kernel.vm.network import start_network
from smol_kernel.vm.process import spawn
config = json.loads(sys.argv[3])
procs, vmm = start_network(spawn, Path(sys.argv[2]), tuple(config["allow"]),
                           tuple(config["dns"]), tuple(config["private"]))
guest = socket.socket(fileno=int(sys.argv[4]))
def pump(src, dst):
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
for a, b in ((guest, vmm), (vmm, guest)):
    threading.Thread(target=pump, args=(a, b), daemon=True).start()
print(json.dumps([p.pid for p in procs]), flush=True)
sys.stdin.read()
"""


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def one_path(tree: Path, world: dict, allow: list[str], guest_dns: str) -> dict:
    """One run of the figures through the helpers ``tree``'s start_network starts."""
    with tempfile.TemporaryDirectory() as rt, tap_guest("smolb", resolver=guest_dns) as guest:
        config = {"allow": allow, "dns": [world["allowed"]], "private": ["10.204.0.0/16"]}
        fd = guest.vm_end.fileno()
        argv = [sys.executable, "-c", STARTER, str(tree), rt, json.dumps(config), str(fd)]
        starter = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert starter.stdout is not None
            pids = json.loads(starter.stdout.readline())
            before = cpu_seconds(pids)
            r = guest.run(GUEST_CODE % {"size": SIZE, "blocked": world["blocked"]}, timeout=600)
            used = cpu_seconds(pids) - before
            figures = json.loads(r.stdout.strip().splitlines()[-1])
        finally:
            starter.kill()
            starter.wait()
    return {"download": SIZE / figures["download"] / 1e6, "refuse": figures["refuse"],
            "first_byte": figures["first_byte"], "cpu_per_mb": used / (SIZE / 1e6)}  # fmt: skip


def helper_pids(runtime_dir: Path) -> list[int]:
    """The VM's network helpers: passt and its guard, or the egress proxy."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(runtime_dir) in cmd and any(
            h in cmd for h in ("passt", "netfilter", "egress.proxy")
        ):
            out.append(int(pid))
    return out


def vm_path(world: dict, settings: dict) -> dict:
    """The figures from a kernel's VM (TCG here: the guest's own speed dominates)."""
    from smol_kernel.sandbox import Sandbox

    with Sandbox(pool_size=0, memory_mib=768, dns_servers=[world["allowed"]],
                 private_answer_ranges=["10.204.0.0/16"], **settings) as sb:  # fmt: skip
        pids = helper_pids(sb.provisioner.vm.runtime_dir)
        before = cpu_seconds(pids)
        ex = sb.run_code(GUEST_CODE % {"size": SIZE, "blocked": world["blocked"]}, timeout=900)
        used = cpu_seconds(pids) - before
    figures = json.loads("".join(ex.logs.stdout).strip().splitlines()[-1])
    return {"download": SIZE / figures["download"] / 1e6, "refuse": figures["refuse"],
            "first_byte": figures["first_byte"], "cpu_per_mb": used / (SIZE / 1e6)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--old-tree", type=Path, help="a checkout with the passt-based allow-list")
    ap.add_argument("--vm", action="store_true", help="also from a kernel's VM (this tree)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as files, outside_world(Path(files)) as world:
        paths = {"proxy (allow_hosts)": (ROOT, ["allowed.test:8080"], "10.0.2.3"),
                 "passt (network on)": (ROOT, [], world["allowed"])}  # fmt: skip
        if args.old_tree:
            paths["old guard (allow_hosts)"] = (args.old_tree, ["allowed.test:8080"],
                                                world["allowed"])  # fmt: skip
        figures: dict[str, list[dict]] = {name: [] for name in paths}
        vm_paths = {"VM: proxy (allow_hosts)": {"allow_hosts": ["allowed.test:8080"]},
                    "VM: passt (network on)": {"network": True}} if args.vm else {}  # fmt: skip
        figures.update({name: [] for name in vm_paths})
        for run in range(args.runs):
            for name, (tree, allow, guest_dns) in paths.items():
                figures[name].append(one_path(tree, world, allow, guest_dns))
            for name, settings in vm_paths.items():
                figures[name].append(vm_path(world, settings))
            print(f"run {run + 1}/{args.runs} done", flush=True)
    print(f"\n{'path':<26} {'download MB/s':>14} {'refuse s':>9} {'first byte s':>13} "
          f"{'CPU s/MB':>9}")  # fmt: skip
    for name, runs in figures.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name:<26} {med['download']:>14.1f} {med['refuse']:>9.4f} "
              f"{med['first_byte']:>13.4f} {med['cpu_per_mb']:>9.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
