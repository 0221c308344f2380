"""Caps on the VMs one server process runs (``max_vms``, ``max_total_memory_mib``).

Counted: every kernel VM that is starting or running, and every VM of the warm pool (ready
or booting). The pool yields first: a start over a cap closes pooled VMs (of other
configurations first) before it is refused, and the pool boots no refill that would cross
a cap. A refusal is a ``QuotaExceeded`` (HTTP 403) whose message names the setting, which
jupyter_server passes to JupyterLab's dialog as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .start_errors import ReadableStartError


class QuotaExceeded(ReadableStartError):
    def __init__(self, message: str):
        super().__init__(403, message)


@dataclass
class Limits:
    max_vms: int = 0  # 0: no cap
    max_total_memory_mib: int = 0


@dataclass
class Ledger:
    """This process's kernel VMs (starting or running), by owner, with their memory."""

    kernels: dict[int, int] = field(default_factory=dict)  # id(provisioner) -> memory_mib
    limits: Limits = field(default_factory=Limits)  # the last kernel start's settings
    refusals: int = 0

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
