"""``smol-kernel doctor|ps|templates|kill|logs``: the host's backend and its kernel VMs."""

from __future__ import annotations

import argparse
import json
import sys

from .sizes import _fmt_size


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..vm.select import select_backend

    sel = select_backend(args.backend, args.image, args.require_hardware_isolation)
    print(f"backend selection (backend={args.backend}, image={args.image}, "
          f"require_hardware_isolation={args.require_hardware_isolation}):")  # fmt: skip
    for step in sel.steps:
        print(f"  - {step}")
    if sel.backend is None:
        assert sel.error is not None
        print(f"\nA kernel would NOT start: {sel.error.reason}")
        if sel.error.fix:
            print(f"To fix: {sel.error.fix}")
        return 1
    assert sel.status is not None and sel.status.isolation is not None
    print(f"\nA kernel would run with backend {sel.backend.name}, isolation "
          f"{sel.status.isolation}.")  # fmt: skip
    if not sel.status.isolation.hardware:
        print(
            "WARNING: TCG is software emulation, not a security boundary. Run on a host "
            "with working KVM for hardware isolation, or set require_hardware_isolation "
            "to refuse TCG."
        )
    return 0


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    import time

    from ..shown import escaped
    from ..vm.process import _alive, list_vms, reap_orphans, vm_processes

    _say_reaped(reap_orphans())
    rows = []
    for rt, state in list_vms():
        pids = vm_processes(rt, state)
        owner_alive = _alive(state.get("owner_pid"), state.get("owner_start"))
        rows.append(
            {
                "vm": rt.id,
                "kernel_id": state.get("label", ""),
                "backend": state.get("backend", "?"),
                "isolation": state.get("isolation", "?"),
                "pid": (state.get("pids") or {}).get("vmm"),
                "uptime_s": round(time.time() - state["created"], 1)
                if "created" in state
                else None,
                "rss_mib": round(sum(_rss_kib(p) for p in pids) / 1024, 1),
                "memory_mib": state.get("memory_mib"),
                "network": bool(state.get("network")),
                "shares": state.get("shares") or [],
                # A pool VM is "booting" until its kernel is prepared, then "pooled".
                "state": (
                    ("pooled" if state.get("pool_ready") else "booting")
                    if state.get("pooled")
                    else "running"
                )
                if pids and owner_alive
                else ("orphaned" if pids else "stale"),
                "owner_pid": state.get("owner_pid"),
                "user": str(state.get("user") or "-"),
            }
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    from .. import template as tpl

    saved = tpl.list_templates()
    if saved:  # what clones map: shared between them, on disk until pruned
        size = _fmt_size(sum(t.disk_bytes() for t in saved))
        print(f"{len(saved)} template(s), {size}, in {tpl.templates_dir()} "
              "(smol-kernel templates)")  # fmt: skip
    if not rows:
        print("no kernel VMs running")
        return 0
    print(f"{'VM':<9} {'KERNEL ID':<37} {'USER':<12} {'BACKEND':<8} {'ISOL':<5} {'PID':>7} "
          f"{'UPTIME':>8} {'RSS':>9} {'STATE':<8} {'NET':<3} SHARES")  # fmt: skip
    for r in rows:  # client-chosen kernel ids and user names: shown escaped
        up = f"{r['uptime_s']:.0f}s" if r["uptime_s"] is not None else "?"
        net = "on" if r["network"] else "off"
        shares = " ".join(escaped(s) for s in r["shares"]) or "-"
        print(f"{escaped(r['vm']):<9} {escaped(r['kernel_id']) or '-':<37} "
              f"{escaped(r['user'])[:12]:<12} {escaped(r['backend']):<8} "
              f"{escaped(r['isolation']):<5} {escaped(r['pid'] or '-'):>7} {up:>8} "
              f"{r['rss_mib']:>6.0f}MiB {r['state']:<8} {net:<3} {shares}")  # fmt: skip
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    """List, remove or prune kernel templates (saved VMs clones start from)."""
    from .. import template as tpl

    templates = tpl.list_templates()
    if args.prune:
        removed = tpl.prune(args.idle_days)
        print(f"removed {len(removed)} template(s)" + "".join(f"\n  {k}" for k in removed))
        return 0
    if args.rm:
        chosen = [t for t in templates if args.rm == "all" or t.key.startswith(args.rm)]
        if not chosen:
            print(f"smol-kernel: no template matches {args.rm!r}", file=sys.stderr)
            return 1
        for t in chosen:
            size = t.disk_bytes()
            tpl.remove(t)
            print(f"removed template {t.key} ({_fmt_size(size)})")
        return 0
    rows = [{"key": t.key, "folder": str(t.folder), "disk_bytes": t.disk_bytes(), **t.meta}
            for t in templates]  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"templates in {tpl.templates_dir()}: {len(rows)}, "
          f"{_fmt_size(sum(r['disk_bytes'] for r in rows))} on disk")  # fmt: skip
    for r in rows:
        print(f"  {r['key'][:12]}  {_fmt_size(r['disk_bytes']):>10}  built in "
              f"{r.get('build_s', '?')}s  {r.get('plan', '')}")  # fmt: skip
    return 0


def _say_reaped(ids: list[str]) -> None:
    """Leftovers of exited owners (a SIGKILLed server) go whenever we look at VMs."""
    if ids:
        print(f"smol-kernel: removed {len(ids)} leftover VM(s) whose owner had exited: "
              f"{', '.join(ids)}", file=sys.stderr)  # fmt: skip


def _find_vm(ident: str, vms: list) -> tuple | None:
    """The one VM whose id or kernel id starts with ``ident``; says why on stderr if none."""
    matches = [
        (rt, st) for rt, st in vms
        if rt.id.startswith(ident) or (st.get("label") or "").startswith(ident)
    ]  # fmt: skip
    if not matches:
        print(f"smol-kernel: no kernel VM matches {ident!r} (see: smol-kernel ps)",
              file=sys.stderr)  # fmt: skip
        return None
    if len(matches) > 1:
        ids = ", ".join(rt.id for rt, _ in matches)
        print(f"smol-kernel: {ident!r} matches several VMs ({ids}); be more specific",
              file=sys.stderr)  # fmt: skip
        return None
    return matches[0]


def cmd_kill(args: argparse.Namespace) -> int:
    from ..shown import escaped
    from ..vm.process import kill_vm_dir, list_vms, reap_orphans

    _say_reaped(reap_orphans())
    status = 0
    vms = list_vms()
    for ident in args.ids:
        if (found := _find_vm(ident, vms)) is None:
            status = 1
            continue
        rt, st = found
        kill_vm_dir(rt, st)
        label = f" (kernel {escaped(st['label'])})" if st.get("label") else ""
        print(f"killed VM {rt.id}{label}")
    return status


def cmd_logs(args: argparse.Namespace) -> int:
    from ..shown import printable
    from ..vm.base import read_tail
    from ..vm.process import list_vms

    if (found := _find_vm(args.id, list_vms())) is None:
        return 1
    rt, _ = found
    if args.network:
        return _print_egress(rt.path, args.json)
    # Guest-written: no terminal escape sequences or other control characters get through.
    sys.stdout.write(printable(read_tail(rt.path / "console.log", args.bytes)))
    return 0


def _print_egress(rt_path, as_json: bool) -> int:
    import time

    from ..shown import printable
    from ..vm.network import describe_destination, read_egress_log

    log = read_egress_log(rt_path)
    if log is None:
        print("no network log: the kernel has no network (or its guard has not written yet)",
              file=sys.stderr)  # fmt: skip
        return 1
    if as_json:
        print(json.dumps(log, indent=1))
        return 0
    allow = log.get("allow_hosts")
    print(f"allow-list: {', '.join(allow) if allow else 'none (network on for every destination)'}")
    print(f"allowed: {log.get('allowed', 0)}  blocked: {log.get('blocked', 0)}")
    for e in sorted(log.get("entries", []), key=lambda e: e.get("first", 0)):
        when = time.strftime("%H:%M:%S", time.localtime(e.get("last", 0)))
        # Names come from the guest's queries (sanitized by the guard; printable() anyway).
        print(printable(f"{e.get('verdict', '?'):8} {e.get('count', 0):6}x  last {when}  "
                        f"{describe_destination(e)}"))  # fmt: skip
    if log.get("entries_lost"):
        print(f"({log['entries_lost']} attempts to further destinations not itemized)")
    return 0
