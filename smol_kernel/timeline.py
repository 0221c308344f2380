"""Checkpoint, rewind and fork a live kernel (QEMU VMs).

``Timeline`` belongs to one kernel's provisioner and works on the io loop, on the kernel's
state (``kernel_state.py``).

* **checkpoint** pauses the kernel's VM, saves its memory (as a RAM file later restores map
  copy-on-write) and devices, copies its disk, and lets it run on
  (``QemuBackend.checkpoint``; files in ``checkpoint.py``). Asked by the host (API, CLI,
  REST), it is taken only when the kernel is idle: new shell requests wait in the relay
  until the VM runs again, and a kernel still answering one is refused at once ("busy")
  rather than saved mid-cell. Asked by ``%checkpoint`` in a cell,
  it is taken right there, with the kernel inside that magic.
* **rewind** restores a new VM from a checkpoint, moves every client connection to it
  (same kernel id, ports and key: clients stay connected; ``relay/kernel_relay.py``), then kills the
  old VM. The restored kernel drops what it had queued, takes the key, and once its
  clients are attached says which checkpoint it is at (busy, a stream line, idle); asked by
  ``%rewind`` in a cell, it answers that cell. Shell requests the old kernel had not
  answered are sent to the new one. Refused when the host asks and the kernel is busy.
* **fork** is a checkpoint (named, or a temporary one) restored as new kernels, each with
  its own key, fresh entropy and reseeded ``random``/numpy (``SmolVMProvisioner`` launches
  them with ``restore_from``).

Limits: checkpoints count against ``max_total_memory_mib`` at their size on disk; a kernel
keeps ``max_checkpoints`` (the oldest not kept goes, logged); the guest (a magic) may make
the host save or restore at most once per ``checkpoint_interval`` seconds (a failed attempt
counts) and save at ``guest_checkpoint_mib_per_s`` of disk writes on average, one guest
request is handled at a time (others are refused), and what the guest saves never replaces
a checkpoint nor pushes out one the host saved, nor is restored by ``restore_on_crash``
(unless ``restore_guest_checkpoints``). Not possible: kernels
with shares (QEMU cannot save a mounted 9p folder), libkrun, images from before checkpoints
(rebuild them).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Awaitable, Callable

from . import checkpoint as store
from . import metrics, quota, template
from .agent_client import AgentError, GuestAgent
from .checkpoint import Checkpoint, CheckpointError
from .guest import protocol as P
from .kernel_state import KernelState
from .kernel_vm import KernelPlan, restore_and_connect
from .packages.installer import InstallError, InstallReport
from .packages.requirements import RequirementError
from .planning import KernelPlanner
from .pool import warm_pool
from .settings import KernelSettings
from .shown import escaped
from .vm.base import Vm, VmError
from .vm.qemu import QemuBackend

MAX_BUSY = 64  # requests answered "busy" waiting for their answer (a magic sends one)
SAVE_TIMEOUT = 300.0  # seconds a save may stream (a 16 GiB guest at disk speed)
QUIET_GRACE = 1.0  # seconds a host request waits for an answer already on its way
SETTLE_S = 0.05  # after moving clients, before the restored kernel speaks (zmq handshakes)
MAX_FINISH_HEADER = 16 << 10  # bytes of the header a %rewind cell passes for its reply


class Timeline:
    """One kernel's checkpoints (see the module doc). It works on the kernel's state and
    reads its settings; ``on_vm_changed`` is the provisioner's, called when a rewind gives
    the kernel a new VM."""

    def __init__(self, settings: KernelSettings, state: KernelState, planner: KernelPlanner,
                 on_vm_changed: Callable[[], Awaitable[None]],
                 install: Callable[[list[str]], Awaitable[InstallReport]] | None = None,
                 ) -> None:  # fmt: skip
        self.settings = settings  # read only
        self.state = state
        self.planner = planner
        self._on_vm_changed = on_vm_changed
        self._install = install  # %pip install (the provisioner's; docs/packages.md)
        self._busy = asyncio.Lock()
        self._last_guest_op: dict[str, float] = {}  # when the kernel last made the host
        # save ("checkpoints") or restore ("rewinds")
        self._last_refusal_log = float("-inf")
        self._guest_writes_until = float("-inf")  # the kernel's next save, by bandwidth
        self._guest_task: asyncio.Task | None = None
        # "busy" answers to requests that overlapped one being served, sent one at a time;
        # every request gets an answer (a magic waits for it), at most MAX_BUSY queued.
        self._busy_rids: collections.deque[int] = collections.deque(maxlen=MAX_BUSY)
        self._refusal: asyncio.Task | None = None

    # ------------------------------------------------------------------ checks
    @property
    def kernel_id(self) -> str:
        return self.state.kernel_id

    def why_not_for(self, plan: KernelPlan) -> str | None:
        """Why kernels of ``plan`` cannot be saved or restored (None: they can)."""
        if not isinstance(self.state.vm_backend, QemuBackend):
            return f"the {plan.backend} backend cannot save a VM (QEMU can)"
        if plan.shares:
            return ("this kernel has host folders shared (shares, share_cwd), and QEMU "
                    "cannot save a VM with a mounted 9p folder: use a kernelspec without "
                    "shares")  # fmt: skip
        return None

    def _why_not(self) -> str | None:
        plan: KernelPlan | None = self.state.plan
        vm, agent = self.state.vm, self.state.agent
        if vm is None or agent is None or plan is None or vm.poll() is not None:
            return "the kernel is not running"
        if (why := self.why_not_for(plan)) is not None:
            return why
        return None

    def plan_key(self) -> str:
        plan = self.state.plan
        assert plan is not None
        return template.template_key(plan, self.state.vm_backend, plan.isolation)

    def list(self) -> list[Checkpoint]:
        return store.list_checkpoints(self.kernel_id)

    def _quota(self, extra_mib: int) -> None:
        """Checkpoints count against the memory cap, at their size on disk."""
        limits = self.planner.limits()
        if not limits.max_total_memory_mib:
            return
        held = store.total_mib()
        used = sum(quota.ledger().kernels.values()) + sum(warm_pool().memory())
        if used + held + extra_mib > limits.max_total_memory_mib:
            metrics.quota_refused()
            raise CheckpointError(
                f"a checkpoint of this kernel needs up to {extra_mib} MiB, and this server's "
                f"kernel VMs ({used} MiB) and checkpoints ({held} MiB) already count "
                f"against max_total_memory_mib = {limits.max_total_memory_mib} MiB: remove "
                "checkpoints (smol-kernel checkpoints --rm) or shut down a kernel"
            )

    async def _wait_quiet(self, hold: bool = True) -> None:
        """Hold new requests; raise (releasing them) if the kernel is still answering one.
        ``hold=False``: only check, holding nothing (before a save's slow preparation, so
        that a busy kernel is refused at once)."""
        relay = self.state.relay
        if hold:
            relay.hold_requests()
        deadline = time.monotonic() + QUIET_GRACE
        while relay.unanswered_requests():
            if time.monotonic() > deadline:
                if hold:
                    relay.release()
                raise CheckpointError(
                    "the kernel is running a cell: checkpoints and rewinds happen when it is "
                    "idle (wait for the cell, or interrupt it)"
                )
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ checkpoint
    async def checkpoint(self, name: str | None = None, keep: bool = False, *,
                         from_guest: bool = False) -> Checkpoint:  # fmt: skip
        """Save the kernel now (see the module doc); returns the checkpoint."""
        async with self._busy:
            return await self._checkpoint(name, keep, from_guest)

    async def _checkpoint(self, name: str | None, keep: bool, from_guest: bool) -> Checkpoint:
        if (why := self._why_not()) is not None:
            raise CheckpointError(f"cannot checkpoint this kernel: {why}")
        name = store.check_name(name) if name else self._next_name()
        if from_guest:
            if store.load(self.kernel_id, name) is not None:
                raise CheckpointError(
                    f"this kernel has a checkpoint {name!r} already, and a checkpoint asked "
                    "from the kernel never replaces one: pick another name"
                )
            self._rate_limit("checkpoints")
            self._bandwidth_limit()
        plan = self.state.plan
        self._quota(plan.memory_mib + plan.disk_mib)
        vm = self.state.vm
        work = None
        if not from_guest:
            await self._wait_quiet(hold=False)  # a kernel running a cell: refused at once
        # While it saves, the VM's memory is there twice (the receiver's copy): counted
        # against max_total_memory_mib like a kernel's, until the save ends.
        saving, book = object(), quota.ledger()
        book.kernels[id(saving)] = plan.memory_mib
        try:
            work = store.staging(self.kernel_id, name)
            # Requests wait from when everything is ready to pause (not while the receiver
            # allocates) until the VM runs again (not until its RAM file is written).
            paused = await self.state.vm_backend.checkpoint(
                vm, store.Snapshot(work), SAVE_TIMEOUT,
                on_resumed=None if from_guest else self.state.relay.release,
                before_pause=None if from_guest else self._wait_quiet,
            )  # fmt: skip
            cp = store.commit(work, self.kernel_id, name, paused_s=paused, keep=keep,
                              plan_key=self.plan_key(), memory_mib=plan.memory_mib,
                              description=plan.describe(), by_kernel=from_guest)  # fmt: skip
        except BaseException:
            if work is not None:
                await asyncio.to_thread(shutil.rmtree, work, True)
            raise
        finally:
            book.kernels.pop(id(saving), None)
            if not from_guest:
                self.state.relay.release()
        if from_guest:  # what it wrote is charged against the guest's disk bandwidth
            rate = max(self.settings.guest_checkpoint_mib_per_s, 1e-3) * (1 << 20)
            self._guest_writes_until = time.monotonic() + cp.size_bytes / rate
        dropped = await asyncio.to_thread(store.enforce_cap, self.kernel_id,
                                          self.settings.max_checkpoints, from_guest)  # fmt: skip
        for old in dropped:
            self.state.log.info("kernel %s: dropped checkpoint %s (max_checkpoints = %d)",
                                self.state.shown_id, old.name,
                                self.settings.max_checkpoints)  # fmt: skip
        self.state.log.info("kernel %s: checkpoint %s saved (%d MiB, kernel paused %.2fs)",
                            self.state.shown_id, escaped(name), cp.size_bytes >> 20,
                            paused)  # fmt: skip
        return cp

    def _rate_limit(self, what: str) -> None:
        """The kernel may make the host save or restore once per checkpoint_interval (a
        failed attempt counts: a guest that makes saves fail cannot retry at once)."""
        last = self._last_guest_op.get(what, float("-inf"))
        wait = self.settings.checkpoint_interval - (time.monotonic() - last)
        if wait > 0:
            raise CheckpointError(
                f"{what} from the kernel are rate-limited: the next one in {wait:.0f}s "
                "(SmolVMProvisioner.checkpoint_interval)"
            )
        self._last_guest_op[what] = time.monotonic()

    def _bandwidth_limit(self) -> None:
        """The kernel's saves use ``guest_checkpoint_mib_per_s`` of disk bandwidth at most,
        on average: the next waits until the last one's bytes are paid for."""
        wait = self._guest_writes_until - time.monotonic()
        if wait > 0:
            raise CheckpointError(
                f"checkpoints from the kernel are limited to "
                f"{self.settings.guest_checkpoint_mib_per_s:g} MiB/s of disk writes: the next "
                f"one in {wait:.0f}s (SmolVMProvisioner.guest_checkpoint_mib_per_s)"
            )

    def _next_name(self) -> str:
        taken = {c.name for c in self.list()}
        n = 1
        while f"cp{n}" in taken:
            n += 1
        return f"cp{n}"

    def find(self, name: str) -> Checkpoint:
        cp = store.load(self.kernel_id, store.check_name(name))
        if cp is None:
            have = ", ".join(c.name for c in self.list()) or "none"
            raise CheckpointError(f"this kernel has no checkpoint {name!r} (it has: {have})")
        return cp

    # ------------------------------------------------------------------ rewind
    async def rewind(self, name: str, *, finish: dict | None = None) -> Checkpoint:
        """Bring the kernel back to checkpoint ``name`` (see the module doc). ``finish``:
        the cell that asked (``%rewind``), answered by the restored kernel."""
        async with self._busy:
            return await self._rewind(name, finish)

    async def _rewind(self, name: str, finish: dict | None) -> Checkpoint:
        if (why := self._why_not()) is not None:
            raise CheckpointError(f"cannot rewind this kernel: {why}")
        cp = self.find(name)
        if cp.plan_key != self.plan_key():
            raise CheckpointError(
                f"checkpoint {name!r} was saved by this kernel with another configuration "
                f"({cp.description}), or before its image or QEMU changed: it cannot be "
                "restored any more"
            )
        if finish is not None:
            self._rate_limit("rewinds")
        k, relay = self.state, self.state.relay
        assert relay is not None and k.plan is not None
        t0 = time.monotonic()
        if finish is None:
            await self._wait_quiet()
        else:
            relay.hold_requests()
        old_vm, old_agent = k.vm, k.agent
        if old_vm is None or old_agent is None:
            relay.release()
            raise CheckpointError("the kernel stopped or restarted during the rewind")
        try:
            vm, agent = await restore_vm(cp, k.plan, k.vm_backend, self.kernel_id,
                                         time.monotonic() + self.settings.startup_timeout,
                                         replaces=old_vm)  # fmt: skip
        except BaseException:
            relay.release()
            raise
        if k.vm is not old_vm or k.relay is not relay or old_vm.poll() is not None:
            # The kernel was shut down, restarted or died meanwhile: not ours to replace.
            await agent.close()
            await vm.close()
            raise CheckpointError("the kernel stopped or restarted during the rewind")
        # From here the old VM goes, whatever happens: the kernel is the restored one.
        await relay.detach()
        k.adopt(vm)
        k.agent = agent
        agent.on_kernel_request = self.on_kernel_request
        old_vm.kill()
        await old_agent.close()
        await old_vm.close()
        try:
            await self._on_vm_changed()
            await resume(agent, k.connection, k.kernel_env, reseed=False)
            await relay.attach(vm.open_stream)
            await asyncio.sleep(SETTLE_S)
            await finish_restore(agent, f"[smol-kernel: rewound to checkpoint {cp.describe()}]",
                                 finish)  # fmt: skip
            skip = {str((finish or {}).get("header", {}).get("msg_id", ""))}
            relay.resend_unanswered(skip)
        except BaseException:
            # A restored kernel that does not resume is a dead kernel: the restarter (or
            # the user) starts a fresh one; parked clients are closed with the relay then.
            vm.kill()
            raise
        finally:
            relay.release()
        k.log.info("kernel %s: rewound to checkpoint %s in %.2fs (VM %s)", k.shown_id,
                   escaped(name), time.monotonic() - t0, vm.id)  # fmt: skip
        return cp

    # ------------------------------------------------------------------ fork
    async def fork_source(self, name: str | None = None) -> tuple[Checkpoint, bool]:
        """The checkpoint forks start from: ``name``, or a temporary one of the kernel as
        it is now (True: remove it once the forks are started)."""
        if name:
            async with self._busy:
                return self.find(name), False
        cp = await self.checkpoint(f"fork-{os.urandom(4).hex()}")
        return cp, True

    # ------------------------------------------------------------------ guest requests
    def on_kernel_request(self, req: dict) -> None:
        """A magic's request (agent event): one at a time, answered by ``kernel_reply``."""
        rid = req.get("rid")
        if self._guest_task is not None and not self._guest_task.done():
            # A request that overlaps the one being served (the kernel can send its next
            # as soon as it has the last answer, before the host's own ack came back) is
            # answered "busy"; the answers go one at a time, so a flood costs one at a time.
            if isinstance(rid, int):
                self._busy_rids.append(rid)
            if self._refusal is None or self._refusal.done():
                self._refusal = asyncio.ensure_future(self._answer_busy())
            return
        self._guest_task = asyncio.ensure_future(self._serve(req))

    async def _answer_busy(self) -> None:
        busy = "the host is busy with this kernel's previous request"
        while self._busy_rids:
            await _reply(self.state.agent, self._busy_rids.popleft(), False, busy)

    async def _serve(self, req: dict) -> None:
        agent = self.state.agent
        rid, op = req.get("rid"), req.get("request")
        try:
            if op == "checkpoint":
                cp = await self.checkpoint(req.get("name"), from_guest=True)
                text = (f"checkpoint {cp.name} saved ({cp.size_bytes / (1 << 20):.0f} MiB, "
                        f"kernel paused {cp.paused_s:.1f}s); %rewind {cp.name} comes back "
                        "here")  # fmt: skip
                await _reply(agent, rid, True, text)
            elif op == "rewind":
                await self.rewind(str(req.get("name") or ""), finish=_finish_of(req))
                # (the old kernel, which asked, is gone; the restored one answered the cell)
            elif op == "install" and self._install is not None:
                report = await self._install(req.get("requirements"))  # (checked strictly)
                await _reply(agent, rid, True, report.text)
            elif op == "checkpoints":
                listed = [c.describe() for c in self.list()]
                await _reply(agent, rid, True, "\n".join(listed) or "no checkpoints yet "
                             "(%checkpoint NAME saves one)")  # fmt: skip
            else:
                await _reply(agent, rid, False, f"unknown request {str(op)[:40]!r}")
        except (CheckpointError, VmError, OSError, RequirementError, InstallError,
                AgentError, TimeoutError) as e:  # fmt: skip
            if agent is not None and not agent.closed.is_set():
                await _reply(agent, rid, False, str(e))
            now = time.monotonic()  # the guest can ask as often as it likes: log sparingly
            if now - self._last_refusal_log >= self.settings.checkpoint_interval:
                self._last_refusal_log = now
                self.state.log.warning("kernel %s: %s refused: %s", self.state.shown_id,
                                   escaped(str(op)[:40]), escaped(str(e)))  # fmt: skip


def _finish_of(req: dict) -> dict | None:
    """The %rewind cell's header and routing identity, bounded (the guest wrote them)."""
    finish = req.get("finish")
    if not isinstance(finish, dict):
        return None
    header, ident = finish.get("header"), finish.get("ident")
    if not isinstance(header, dict) or not isinstance(header.get("msg_id"), str):
        return None
    if len(repr(header)) > MAX_FINISH_HEADER:
        return None
    if not isinstance(ident, list) or len(ident) > 8:
        ident = []
    ident = [str(i)[:1024] for i in ident]
    return {"header": header, "ident": ident}


async def _reply(agent: GuestAgent | None, rid: object, ok: bool, text: str) -> None:
    if agent is None or not isinstance(rid, int):
        return
    with contextlib.suppress(VmError, TimeoutError, OSError):
        await agent.request(P.OP_KERNEL_REPLY, rid=rid, ok=ok, text=text, timeout=10.0)


# ---------------------------------------------------------------------- restoring a VM
async def restore_vm(
    cp: Checkpoint, plan: KernelPlan, backend: QemuBackend, label: str, deadline: float,
    on_vm=None, replaces: Vm | None = None,
) -> tuple[Vm, GuestAgent]:  # fmt: skip
    """A VM restored from ``cp``, running, its agent connected (resume it next);
    ``replaces``: the kernel's VM it takes over from (its egress log goes on)."""
    spec = plan.vm_spec(label)
    if replaces is not None:
        spec = dataclasses.replace(spec, egress_carry=str(replaces.runtime_dir))
    return await restore_and_connect(
        backend, spec, cp.snapshot, deadline, on_vm,
        lambda agent: agent.hello.get("kernel") == "running",
        f"restored from checkpoint {cp.name}, its kernel should be running",
    )  # fmt: skip


async def resume(agent: GuestAgent, connection: dict, env: dict[str, str], reseed: bool) -> None:
    """The restored kernel drops its queued past and takes its key (new for a fork), with
    fresh entropy and the clock."""
    await agent.request(
        P.OP_RESUME, connection=connection, env=env, reseed=reseed,
        entropy=base64.b64encode(os.urandom(64)).decode(), wall_clock=time.time(),
        timeout=30.0,
    )  # fmt: skip


async def finish_restore(agent: GuestAgent, announce: str, finish: dict | None) -> None:
    """The restored kernel says where it is (and answers the cell that asked, if any)."""
    await agent.request(
        P.OP_FINISH, announce=announce, parent=(finish or {}).get("header"),
        ident=(finish or {}).get("ident"), timeout=30.0,
    )  # fmt: skip
