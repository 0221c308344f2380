"""Prometheus metrics for jupyter_server's ``/metrics`` (prometheus_client's default
registry, which that endpoint serves). Without prometheus_client, every call is a no-op."""

from __future__ import annotations

try:
    import prometheus_client as prom
except ImportError:  # pragma: no cover - jupyter_server depends on it
    prom = None

_starts = _start_seconds = _refusals = _rejected = None
if prom is not None:
    _starts = prom.Counter("smol_kernel_vm_starts", "Kernel VMs started, by kind", ["kind"])
    _start_seconds = prom.Histogram(
        "smol_kernel_start_seconds",
        "Seconds from launch to a reachable kernel, by kind (cold, pooled, clone, fork, restored)",
        ["kind"],
        buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
    )
    _refusals = prom.Counter("smol_kernel_quota_refusals", "Kernel starts refused by a quota")
    _rejected = prom.Counter(
        "smol_kernel_guest_messages_rejected",
        "Messages and ZMTP commands from a kernel's VM the host could not parse, dropped",
        ["channel"],
    )


def kernel_started(kind: str, seconds: float) -> None:
    if _starts is not None and _start_seconds is not None:
        _starts.labels(kind).inc()
        _start_seconds.labels(kind).observe(seconds)


def guest_message_rejected(channel: str) -> None:
    if _rejected is not None:
        _rejected.labels(channel).inc()


def quota_refused() -> None:
    if _refusals is not None:
        _refusals.inc()


_egress_blocked = None  # set by the provisioner, which knows its kernels


def count_egress_blocked(total) -> None:
    """``total()``: blocked connection attempts so far, for the counter below."""
    global _egress_blocked
    _egress_blocked = total


class _EgressCollector:
    """A counter read from the network guards' logs when scraped (they are the count)."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "smol_kernel_egress_blocked",
            "Connection attempts and DNS queries the network guard refused (allow-list or host)",
        )
        family.add_metric([], float(_egress_blocked() if _egress_blocked else 0))
        yield family


def _active_vms() -> int:
    from .quota import ledger

    return len(ledger().kernels)


def _pool_vms() -> int:
    from .pool import warm_pool

    return len(warm_pool().memory())


if prom is not None:
    prom.Gauge("smol_kernel_active_vms", "Kernel VMs starting or running").set_function(_active_vms)
    prom.REGISTRY.register(_EgressCollector())
    prom.Gauge("smol_kernel_pool_vms", "Warm-pool VMs, ready or booting").set_function(_pool_vms)
