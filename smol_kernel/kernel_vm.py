"""A kernel VM: a VM booted for one kernel, its agent connection, and the kernel in it.

``KernelPlan`` is everything fixed when the VM boots or the guest interpreter starts: the
warm pool's key. ``boot_kernel_vm`` boots a VM for a plan and starts its kernel, either
prepared (imported and initialised, waiting for its key: a warm-pool VM) or with the
connection at once (a cold start). ``claim`` hands a prepared kernel its key.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .agent_client import GuestAgent
from .errors import KernelStartError
from .guest import protocol as P
from .shown import escaped
from .vm.base import Vm, VmBackend, VmError
from .vm.share import Share
from .vm.spec import VmSpec

# Set per kernel when a VM is claimed; every other variable is part of the plan.
PER_KERNEL_ENV = ("KERNEL_ID", "JPY_SESSION_NAME")


@dataclass(frozen=True)
class KernelPlan:
    """What a kernel VM is, before any kernel's key is known. Equal plans are
    interchangeable: a VM booted for one serves a kernel asking for the other."""

    backend: str
    image: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    network: bool
    dns: tuple[str, ...]
    shares: tuple[Share, ...]
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # sorted; without PER_KERNEL_ENV
    cwd: str
    max_processes: int
    debugger: bool
    allow_hosts: tuple[str, ...] = ()  # the network guard's, not the guest's
    private_answers: tuple[str, ...] = ()  # the guard's too

    @property
    def isolation(self) -> str:
        """What the backend check said the VM gets (kvm, hvf or tcg)."""
        return dict(self.env).get("SMOL_KERNEL_ISOLATION", "?")

    @property
    def two_step(self) -> bool:
        """Can the kernel be prepared before its key is known (an ipykernel argv)?"""
        return P.two_step_argv(list(self.argv)) is not None

    def vm_spec(self, label: str = "", shares_at_claim: bool = False) -> VmSpec:
        return VmSpec(
            image=self.image,
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            disk_mib=self.disk_mib,
            label=label,
            network=self.network,
            dns=self.dns,
            allow_hosts=self.allow_hosts,
            private_answers=self.private_answers,
            shares=self.shares,
            shares_at_claim=shares_at_claim,
        )

    @property
    def network_text(self) -> str:
        if not self.network:
            return "off"
        return f"allow-list of {len(self.allow_hosts)}" if self.allow_hosts else "on"

    def describe(self) -> str:
        return (f"{self.backend} image={self.image} vcpus={self.vcpus} "
                f"memory={self.memory_mib}MiB network={self.network_text} "
                f"shares={len(self.shares)}")  # fmt: skip


async def boot_kernel_vm(
    backend: VmBackend,
    plan: KernelPlan,
    deadline: float,
    connection: dict | None = None,
    per_kernel_env: dict[str, str] | None = None,
    label: str = "",
    on_vm=None,
    late: str = "in time",
    start=None,
) -> tuple[Vm, GuestAgent]:
    """Boot a VM for ``plan`` and start its kernel; without ``connection`` the kernel is only
    prepared (wait for ``agent.kernel_prepared``, then ``claim``). Returns once the kernel is
    prepared, or serving when a connection was given. On failure nothing is left running.
    ``on_vm(vm)`` is called as soon as the VM exists (to show it while it boots); ``start``
    (a coroutine function of the spec) boots it another way (a template VM)."""
    spec = plan.vm_spec(label)
    vm = await (start(spec) if start is not None else backend.start(spec))
    agent: GuestAgent | None = None
    try:
        if on_vm is not None:
            on_vm(vm)
        agent = await GuestAgent.connect(vm, deadline - time.monotonic())
        env = dict(plan.env)
        env.update(per_kernel_env or {})
        await agent.request(
            P.OP_START_KERNEL,
            argv=list(plan.argv),
            env=env,
            cwd=plan.cwd,
            connection=connection or {},
            max_processes=plan.max_processes,
            prepare=connection is None,
            debugger=plan.debugger,
        )
        event = agent.kernel_prepared if connection is None else agent.kernel_ready
        await wait_for_kernel(vm, agent, event, deadline, late)
    except BaseException:
        await _discard(vm, agent)
        raise
    return vm, agent


async def _discard(vm: Vm, agent: GuestAgent | None) -> None:
    """A VM that will not serve: its agent connection closed first, then the VM."""
    if agent is not None:
        await agent.close()
    await vm.close()


async def restore_and_connect(
    backend: VmBackend, spec: VmSpec, snapshot: object, deadline: float, on_vm,
    is_ready: Callable[[GuestAgent], bool], what: str,
) -> tuple[Vm, GuestAgent]:  # fmt: skip
    """A VM restored from ``snapshot`` (a template or a checkpoint), running, its agent
    connected; VmError (and nothing left running) unless ``is_ready(agent)``."""
    vm = await backend.start(spec, restore=snapshot)  # type: ignore[call-arg]
    agent = None
    try:
        if on_vm is not None:
            on_vm(vm)
        agent = await GuestAgent.connect(vm, max(1.0, deadline - time.monotonic()))
        if not is_ready(agent):
            kernel = escaped(str(agent.hello.get("kernel"))[:40])  # the guest's word
            raise VmError(f"VM {vm.id} ({what}): its kernel is {kernel!r}")
    except BaseException:
        await _discard(vm, agent)
        raise
    return vm, agent


async def claim(
    vm: Vm, agent: GuestAgent, connection: dict, per_kernel_env: dict[str, str],
    deadline: float, late: str = "in time",
) -> None:  # fmt: skip
    """Give a prepared kernel its connection key and environment; return once it serves.
    The claim also carries what a clone of a saved VM must not share with its siblings:
    fresh entropy, the host's wall clock, and the shares to mount."""
    await agent.request(
        P.OP_CLAIM_KERNEL, connection=connection, env=per_kernel_env,
        entropy=base64.b64encode(os.urandom(64)).decode(), wall_clock=time.time(),
        shares=vm.spec.claim_mounts(),
    )  # fmt: skip
    await wait_for_kernel(vm, agent, agent.kernel_ready, deadline, late)


async def wait_for_kernel(
    vm: Vm, agent: GuestAgent, event: asyncio.Event, deadline: float, late: str = "in time"
) -> None:
    """Wait for ``event``; raise KernelStartError if the kernel exits, the VM stops or the
    deadline passes first (``late`` completes "the kernel did not answer ...")."""
    waits = [asyncio.ensure_future(e.wait()) for e in (event, agent.kernel_exited, agent.closed)]
    try:
        await asyncio.wait(
            waits, timeout=max(0.0, deadline - time.monotonic()), return_when="FIRST_COMPLETED"
        )
    finally:
        for f in waits:
            f.cancel()
    if event.is_set():
        return
    if agent.kernel_exited.is_set():
        raise KernelStartError(
            f"the kernel exited in the VM with status {agent.kernel_exit_status} before "
            f"it was ready. Its output:\n{agent.kernel_output_tail}"
        )
    what = "the VM stopped" if agent.closed.is_set() else f"the kernel did not answer {late}"
    raise KernelStartError(f"{what}. Guest console:\n{vm.console_tail()}")
