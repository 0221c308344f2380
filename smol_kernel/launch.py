"""Starting a kernel's VM, and which start it gets.

``KernelLauncher`` does for ``SmolVMProvisioner`` what happens between ``pre_launch`` and a
reachable kernel: with the plan and the quota reservation of ``KernelPlanner``
(``planning.py``), it binds the relay and starts the kernel in the first way that works --
from a checkpoint (a fork, or ``restore_on_crash``), by claiming a warm-pool VM, by
restoring a clone of the plan's template, or by a cold boot. It never reports an isolation
other than the backend check found. It keeps no state of its own: what it starts (VM,
agent, relay, start kind) goes into the kernel's state (``kernel_state.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from jupyter_client.connect import KernelConnectionInfo

from . import checkpoint as store
from . import template
from .checkpoint import Checkpoint
from .errors import KernelStartError
from .guest import protocol as P
from .kernel_state import KernelState
from .kernel_vm import KernelPlan, boot_kernel_vm, claim
from .planning import KernelPlanner
from .pool import warm_pool
from .relay import KernelRelay
from .relay.message_pump import MessageGate
from .relay.output_policy import OutputPolicy
from .settings import KernelSettings
from .shown import escaped
from .timeline import Timeline, finish_restore, restore_vm, resume
from .vm.base import VmBackend, VmError
from .vm.qemu import QemuBackend


class KernelLauncher:
    """Starts the VM of one provisioner's kernel (see the module docstring). It works on
    the kernel's state and reads its settings; ``on_vm_changed`` is the provisioner's."""

    def __init__(
        self, settings: KernelSettings, state: KernelState, planner: KernelPlanner,
        timeline: Timeline, on_vm_changed: Callable[[], Awaitable[None]],
    ) -> None:  # fmt: skip
        self.settings = settings  # read only
        self.state = state
        self.planner = planner
        self.timeline = timeline
        self._on_vm_changed = on_vm_changed

    async def warm_up(self) -> str:
        selection = await self.planner.select_backend()
        plan = self.planner.plan(selection)
        if (why := self.planner.why_not_pooled(plan, {})) is not None:
            return f"no pool: {why}"
        assert selection.backend is not None
        warm_pool().want(plan, selection.backend, self.settings.pool_size, self.settings.pool_ttl,
                         self.settings.startup_timeout, self.state.log, self.planner.limits(),
                         self.planner.template_bounds())  # fmt: skip
        return f"keeping {self.settings.pool_size} VM(s) ready ({plan.describe()})"

    async def launch(self, ci: KernelConnectionInfo) -> float:
        """Start the kernel of connection ``ci`` (the provisioner tears down what a failed
        start left); returns the seconds it took."""
        deadline = time.monotonic() + self.settings.startup_timeout
        late = f"within {self.settings.startup_timeout:g}s (startup_timeout)"
        self.state.exit_status = None
        selection = await self.planner.select_backend()
        relay = KernelRelay(
            str(ci.get("transport", "tcp")),
            str(ci.get("ip", "127.0.0.1")),
            {ch: int(ci[f"{ch}_port"]) for ch in P.CHANNEL_PORTS},  # type: ignore[call-overload]
            self._message_gate(ci),
        )
        relay.bind()
        self.state.relay = relay
        self.state.plan = plan = self.planner.plan(selection)
        self.state.backend_name = plan.backend
        self.state.vm_backend = selection.backend
        self.planner.reserve(plan)
        self.state.connection = connection = guest_connection_of(ci)
        self.state.start_kind = None
        t0 = time.monotonic()
        restore, announce = self._restore_source()
        try:
            if restore is not None and not await self._start_restored(
                restore, connection, deadline
            ):
                announce = None
            assert selection.backend is not None
            why_cold = self.planner.why_not_pooled(plan, connection)
            if self.state.start_kind is None and why_cold is None:
                why_cold = await self._start_pooled(selection.backend, plan, connection,
                                                    deadline, late)  # fmt: skip
            if self.state.start_kind is None:
                await self._start_unpooled(selection.backend, plan, connection, deadline, late,
                                           why_cold)  # fmt: skip
            vm = self.state.vm
            assert vm is not None
            if self.state.isolation != dict(plan.env)["SMOL_KERNEL_ISOLATION"]:  # never misreport
                raise KernelStartError(
                    f"VM {vm.id} got isolation {self.state.isolation}, not the "
                    f"{dict(plan.env)['SMOL_KERNEL_ISOLATION']} the backend check found"
                )
            await relay.start_serving(vm.open_stream)
            assert self.state.agent is not None
            self.state.agent.on_kernel_request = self.timeline.on_kernel_request
            await self._on_vm_changed()
        except (VmError, KernelStartError, TimeoutError) as e:
            if time.monotonic() >= deadline and "startup_timeout" not in str(e):
                # Whatever step ran out of time, the user's setting is what to change.
                raise KernelStartError(f"the kernel did not start {late}: {e}") from e
            raise
        self.state.launches += 1
        self.state.crashed = None
        if announce is not None:  # a restored kernel says so once its clients are back
            self.state.finishing = asyncio.ensure_future(self._finish_restore(announce))
        self.state.ready_at = time.monotonic()
        self.state.end_reason = "ended"
        self.state.log.info(
            "kernel %s: ready in VM %s (%s start, %.1fs)",
            self.state.shown_id, vm.id, self.state.start_kind, self.state.ready_at - t0,
        )  # fmt: skip
        return self.state.ready_at - t0

    def _message_gate(self, ci: KernelConnectionInfo) -> MessageGate:
        """The kernel's key, output policy and iopub cap, for the relay."""
        if ci.get("curve_secretkey"):
            raise KernelStartError(
                f"cannot start a {self.state.display_name} kernel with CurveZMQ "
                "encryption: the host reads what the kernel sends (output policy, memory "
                "bounds), which an end-to-end encrypted connection would hide. Use the "
                "default HMAC-signed connection (the channels stay on this host)."
            )
        key = ci.get("key") or b""
        return MessageGate(
            key=key.encode() if isinstance(key, str) else bytes(key),
            signature_scheme=str(ci.get("signature_scheme") or "hmac-sha256"),
            policy=None if self.settings.trusted_outputs else OutputPolicy(),
            iopub_backlog=max(1, self.settings.iopub_backlog_mib) << 20,
        )

    async def _start_unpooled(
        self, backend: VmBackend, plan: KernelPlan, connection: dict, deadline: float,
        late: str, why_not_pooled: str | None,
    ) -> None:  # fmt: skip
        """No pooled VM: restore a clone of the plan's template (building it first, once
        per configuration), or boot cold when the plan cannot be cloned."""
        pool = warm_pool()
        why_cold = template.why_not_cloneable(plan, backend)
        if why_cold is None and not connection.get("curve_secretkey"):
            built = isinstance(backend, QemuBackend) and template.find(plan, backend)
            if not built:
                self.state.log.info(
                    "kernel %s: building the template of %s (first start of this "
                    "configuration)", self.state.shown_id, plan.describe(),
                )  # fmt: skip
            async with pool.cold_start() if not built else contextlib.nullcontext():
                vm, self.state.agent, how = await template.prepared_vm(
                        plan, backend, deadline, self.state.kernel_id, self.state.adopt,
                    self.state.log, self.planner.template_bounds(),
                )  # fmt: skip
            self.state.log.info("kernel %s: %s VM %s (%s)", self.state.shown_id,
                            "restored clone" if how == "clone" else "booted", vm.id,
                            why_not_pooled)  # fmt: skip
            await claim(vm, self.state.agent, connection, self.state.kernel_env, deadline, late)
            self.state.start_kind = how
            return
        self.state.log.info("kernel %s: cold start (%s)", self.state.shown_id,
                            why_cold or why_not_pooled)  # fmt: skip
        async with pool.cold_start():
            _, self.state.agent = await boot_kernel_vm(
                backend, plan, deadline, connection, self.state.kernel_env,
                label=self.state.kernel_id, on_vm=self.state.adopt, late=late,
            )  # fmt: skip
        self.state.start_kind = "cold"

    def _restore_source(self) -> tuple[Checkpoint | None, str | None]:
        """A checkpoint this launch restores instead of starting afresh (a fork's first
        launch; a restart after a crash with ``restore_on_crash``), and what the restored
        kernel says."""
        cp, self.state.restore_from = self.state.restore_from, None
        if cp is not None:
            return cp, (f"[smol-kernel: forked from checkpoint {cp.name} of kernel "
                        f"{cp.kernel_id}]")  # fmt: skip
        if self.state.crashed and self.settings.restore_on_crash and self.state.kernel_id:
            saved = [cp for cp in store.list_checkpoints(self.state.kernel_id)
                     if not cp.by_kernel or self.settings.restore_guest_checkpoints]  # fmt: skip
            if saved:
                latest = saved[-1]
                return latest, (f"[smol-kernel: the kernel died ({self.state.crashed}); restored "
                                f"from its latest checkpoint, {latest.describe()}]")  # fmt: skip
            self.state.log.info("kernel %s: died (%s) with no checkpoint the host made to "
                            "restore (restore_guest_checkpoints)",
                            self.state.shown_id, self.state.crashed)  # fmt: skip
        return None, None

    async def _start_pooled(
        self, backend: VmBackend, plan: KernelPlan, connection: dict, deadline: float,
        late: str,
    ) -> str | None:  # fmt: skip
        """Claim a VM of the warm pool (and keep the pool filled); None when the kernel
        runs in it, else why not."""
        pool = warm_pool()
        settings = self.settings
        pool.want(
            plan,
            backend,
            settings.pool_size,
            settings.pool_ttl,
            settings.startup_timeout,
            self.state.log,
            self.planner.limits(),
            self.planner.template_bounds(),
        )
        pooled = await pool.claim(plan, deadline)
        if pooled is None:
            return pool.why_miss(plan)
        self.state.adopt(pooled.vm)
        self.state.agent = pooled.agent
        pooled.vm.set_label(self.state.kernel_id)
        self.state.log.info(
            "kernel %s: claimed pooled VM %s (%s, isolation %s)",
            self.state.shown_id, pooled.vm.id, self.state.backend_name, self.state.isolation,
        )  # fmt: skip
        try:
            await claim(pooled.vm, pooled.agent, connection, self.state.kernel_env, deadline, late)
        except (KernelStartError, VmError) as e:  # it died while it waited
            await self.state.drop_vm()
            return f"the claimed VM {pooled.vm.id} failed: {str(e)[:200]}"
        self.state.start_kind = "pooled"
        return None

    async def _start_restored(self, cp: Checkpoint, connection: dict, deadline: float) -> bool:
        """Start the kernel from a checkpoint. False: a crash restore that failed (start
        afresh instead); a fork that cannot start from its checkpoint raises."""
        try:
            await self._restore(cp, connection, deadline)
            return True
        except (KernelStartError, VmError, OSError) as e:
            if cp.kernel_id != self.state.kernel_id:
                raise
            self.state.log.warning("kernel %s: not restored from checkpoint %s (%s): starting "
                               "afresh", self.state.shown_id, escaped(cp.name), e)  # fmt: skip
            await self.state.drop_vm()
            self.state.start_kind = None
            return False

    async def _restore(self, cp: Checkpoint, connection: dict, deadline: float) -> None:
        plan = self.state.plan
        assert plan is not None
        if (why := self.timeline.why_not_for(plan)) is not None:
            raise KernelStartError(f"cannot start from checkpoint {cp.name}: {why}")
        if cp.plan_key != self.timeline.plan_key():
            raise KernelStartError(
                f"cannot start from checkpoint {cp.name}: it was saved by a kernel of another "
                f"configuration ({cp.description}), or before the image or QEMU changed"
            )
        fork = cp.kernel_id != self.state.kernel_id
        k = self.state
        vm, k.agent = await restore_vm(cp, plan, k.vm_backend, k.kernel_id, deadline,
                                       on_vm=self.state.adopt)  # fmt: skip
        await resume(self.state.agent, connection, self.state.kernel_env, reseed=fork)
        self.state.start_kind = "fork" if fork else "restored"
        k.log.info("kernel %s: VM %s restored from checkpoint %s of kernel %s",
                   k.shown_id, vm.id, escaped(cp.name), escaped(cp.kernel_id))  # fmt: skip

    async def _finish_restore(self, announce: str) -> None:
        """Let the restored kernel speak once a client listens (2 s at most: a kernel
        saved inside %checkpoint waits for this before it handles anything)."""
        agent, relay = self.state.agent, self.state.relay
        if agent is None or relay is None:
            return
        await relay.wait_for_listener(2.0)
        try:
            await finish_restore(agent, announce, None)
            self.state.log.info("kernel %s: told its clients: %s", self.state.shown_id, announce)
        except (VmError, TimeoutError) as e:
            self.state.log.warning("kernel %s: the restored kernel did not resume: %s",
                               self.state.shown_id, e)  # fmt: skip


def guest_connection_of(ci: dict) -> dict:
    """What the guest kernel needs of the connection info: keys, not host addresses."""
    out = {}
    for k in ("key", "signature_scheme", "kernel_name", "curve_publickey", "curve_secretkey"):
        v = ci.get(k)
        if v is None:
            continue
        out[k] = v.decode() if isinstance(v, bytes) else v
    return out
