"""What one kernel is now: the state its provisioner owns and its helpers work on.

``SmolVMProvisioner`` holds one ``KernelState``. It hands it, with its settings
(``settings.py``, read only), to ``KernelPlanner``, ``KernelLauncher`` and ``Timeline``:
they read and change this state, and never the provisioner. The provisioner's ``vm``,
``agent``, ``isolation`` ... are views of it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .shown import escaped

if TYPE_CHECKING:
    from .agent_client import GuestAgent
    from .checkpoint import Checkpoint
    from .kernel_vm import KernelPlan
    from .relay import KernelRelay
    from .vm.base import Vm, VmBackend
    from .vm.share import Share


@dataclass(eq=False)
class KernelState:
    """One kernel's inputs (set before each launch), what runs it, and its history."""

    log: logging.Logger | logging.LoggerAdapter
    display_name: str = "smolvm"  # the kernelspec's, for messages
    kernel_id: str = ""  # the kernel manager's (a REST client may choose it)

    # The launch's inputs (pre_launch).
    guest_env: dict[str, str] = field(default_factory=dict)  # without PER_KERNEL_ENV
    kernel_env: dict[str, str] = field(default_factory=dict)  # PER_KERNEL_ENV
    guest_argv: list[str] = field(default_factory=list)
    shares: tuple[Share, ...] = ()
    cwd: str = "/root"
    connection: dict = field(default_factory=dict)  # what the guest gets of the connection
    restore_from: Checkpoint | None = None  # a fork's source, for its first launch
    notebook: str | None = None  # the host path of the notebook it serves, if it was said

    # What runs the kernel now.
    vm: Vm | None = None
    agent: GuestAgent | None = None
    relay: KernelRelay | None = None
    isolation: str | None = None
    plan: KernelPlan | None = None  # what the kernel's VM was booted as
    backend_name: str | None = None
    vm_backend: VmBackend | None = None
    start_kind: str | None = None  # "cold", "clone", "pooled", "fork" or "restored"
    ready_at: float | None = None  # time.monotonic() when the kernel was ready
    finishing: asyncio.Future | None = None  # a restored kernel's first words

    # Its history.
    launches: int = 0
    crashed: str | None = None  # why the kernel died, when it was not asked to
    exit_status: int | None = None
    end_reason: str = "ended"  # why the kernel's VM went, for the audit line

    @property
    def shown_id(self) -> str:
        """The kernel id for log lines: a REST client chooses it, so escaped."""
        return escaped(self.kernel_id)

    def adopt(self, vm: Vm) -> None:
        """``vm`` is this kernel's from now on (even while it boots: kill() reaches it)."""
        self.vm = vm
        self.isolation = str(vm.isolation)

    async def drop_vm(self) -> None:
        """Close the agent and destroy the VM, keeping the relay (a start that goes on
        another way). Idempotent."""
        agent, vm = self.agent, self.vm
        self.agent = self.vm = None
        if agent is not None:
            await agent.close()
        if vm is not None:
            await vm.close()
