"""Caps on the VMs one server process runs (``max_vms``, ``max_total_memory_mib``).

Counted: every kernel VM that is starting or running, and every VM of the warm pool (ready
or booting). The pool yields first: a start over a cap closes pooled VMs (of other
configurations first) before it is refused, and the pool boots no refill that would cross
a cap. A refusal is a ``QuotaExceeded`` (HTTP 403) whose message names the setting, which
jupyter_server passes to JupyterLab's dialog as it is.

Two levels: the server's own settings (Jupyter config files, command line; the memory cap
defaults to the spawner's ``MEM_LIMIT``) cap the whole process, whatever a kernelspec says;
a kernelspec's settings can only tighten them for its own kernels and pool. Both are known
before any VM boots, warm-ups included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import QuotaExceeded

__all__ = ["Limits", "QuotaExceeded"]


def _strictest(*caps: int) -> int:
    set_caps = [c for c in caps if c > 0]
    return min(set_caps) if set_caps else 0


@dataclass(frozen=True)
class Limits:
    max_vms: int = 0  # 0: no cap
    max_total_memory_mib: int = 0

    def tighter(self, other: Limits) -> Limits:
        """The caps of both at once."""
        memory = _strictest(self.max_total_memory_mib, other.max_total_memory_mib)
        return Limits(_strictest(self.max_vms, other.max_vms), memory)


@dataclass
class Ledger:
    """This process's kernel VMs (starting or running), by owner, with their memory, and
    the server-wide caps (set from the server's config by the first provisioner)."""

    kernels: dict[int, int] = field(default_factory=dict)  # id(KernelState) -> memory_mib
    server: Limits = field(default_factory=Limits)

    def usage(self, pool_memory: list[int]) -> tuple[int, int]:
        return len(self.kernels) + len(pool_memory), sum(self.kernels.values()) + sum(pool_memory)

    def refusal(self, pool_memory: list[int], memory_mib: int, limits: Limits) -> str | None:
        """Why one more VM of ``memory_mib`` would cross a cap, or None."""
        vms, mem = self.usage(pool_memory)
        if limits.max_vms and vms + 1 > limits.max_vms:
            return (f"this server already runs {vms} kernel VM(s) and allows "
                    f"{limits.max_vms} (SmolVMProvisioner.max_vms): shut down a kernel "
                    "first, or ask the administrator to raise max_vms")  # fmt: skip
        if limits.max_total_memory_mib and mem + memory_mib > limits.max_total_memory_mib:
            return (f"this kernel needs {memory_mib} MiB and this server's kernel VMs already "
                    f"have {mem} of {limits.max_total_memory_mib} MiB "
                    "(SmolVMProvisioner.max_total_memory_mib): shut down a kernel first, "
                    "or use a smaller memory_mib")  # fmt: skip
        return None


_ledger = Ledger()


def ledger() -> Ledger:
    """This process's ledger (use it on the io loop)."""
    return _ledger
