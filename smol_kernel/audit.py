"""The operator's record of kernels: one structured log line when a kernel starts and one
when it ends (with what its network guard refused), and the count of refused connections
for Prometheus. Owns the set of running kernels of this process (for the exit hook)."""

from __future__ import annotations

import contextlib
import json
import time
import weakref
from typing import Any

from . import metrics
from .exit_hooks import on_exit
from .vm.network import egress_summary
from .vm.process import owner_user

_running: weakref.WeakSet = weakref.WeakSet()  # provisioners whose kernel is up
_blocked_ended = 0  # refused attempts of kernels that have ended


def record(prov: Any, event: str, **fields: Any) -> None:
    """One structured line about ``prov``'s kernel (``smol-kernel audit: {...}``)."""
    plan = prov.plan
    line = {
        "event": event,
        "user": owner_user(),
        "kernel_id": prov.kernel_id,
        "vm_id": prov.vm.id if prov.vm else None,
        "backend": prov.backend_name,
        "isolation": prov.isolation,
        "vcpus": plan.vcpus if plan else None,
        "memory_mib": plan.memory_mib if plan else None,
        "network": plan.network if plan else None,
        "shares": [str(s) for s in plan.shares] if plan else [],
        **fields,
    }
    prov.log.info("smol-kernel audit: %s", json.dumps(line))


def kernel_started(prov: Any, kind: str, seconds: float) -> None:
    _running.add(prov)
    metrics.kernel_started(kind, seconds)
    # The kernel manager's: the kernelspec that ran, and the name a client asked for when
    # the server routed it (lockdown.RoutingKernelManager).
    manager = getattr(prov, "parent", None)
    names = {"kernelspec": getattr(manager, "kernel_name", None)}
    if (requested := getattr(manager, "smol_requested_name", None)) is not None:
        names["requested"] = requested
    record(prov, "kernel_start", start=kind, start_s=round(seconds, 2), **names)


def kernel_ended(prov: Any, reason: str) -> None:
    """The end line, once per launch (its VM must still be there: the egress log is in its
    runtime folder)."""
    global _blocked_ended
    if prov.ready_at is not None:
        lifetime = round(time.monotonic() - prov.ready_at, 1)
        extra = {}
        if (log := prov.egress_log()) is not None:
            extra["egress"] = egress_summary(log)
            _blocked_ended += int(log.get("blocked", 0))
        record(prov, "kernel_end", reason=reason, lifetime_s=lifetime, **extra)
        prov.ready_at = None
    _running.discard(prov)


def egress_blocked_total() -> int:
    """Refused connection attempts of every kernel of this process, ended or running."""
    total = _blocked_ended
    for prov in list(_running):
        with contextlib.suppress(Exception):
            total += int((prov.egress_log() or {}).get("blocked", 0))
    return total


def _audit_exit() -> None:
    """A server that exits without shutting its kernels down (stopped by a spawner) still
    logs their end, before the VMs go (``exit_hooks``: stage ``audit``)."""
    for prov in list(_running):
        with contextlib.suppress(Exception):
            kernel_ended(prov, "server exited")


metrics.count_egress_blocked(egress_blocked_total)
on_exit("audit", _audit_exit)
