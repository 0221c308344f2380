"""WarmPool: VMs booted ahead of time, each holding a kernel prepared but for its key.

Guarantees:

* A pooled VM serves one kernel, ever: ``claim`` removes it from the pool for good. Restarts
  and later kernels claim other VMs (or boot cold).
* A VM is handed out only for an equal ``KernelPlan`` (image, size, network, shares, argv,
  environment, working folder, limits): nothing fixed at boot differs from a cold start.
* Refills run in the background, one VM at a time, never while a cold start is running
  (a refill for another plan is cancelled when one begins; one for the same plan is
  waited for instead: it is ahead of a new boot). A pooled VM unused for ``ttl`` seconds
  is replaced, and a dead one is dropped.
* Pooled VMs are ordinary VMs of this process: they die with it (parent-death signal),
  are closed at exit, reaped by ``reap_orphans``, and ``smol-kernel ps`` lists them as
  ``pooled``. Nothing runs in the background until some plan asks for a pool.

One pool per process, living on the io loop (``ioloop.io_loop``); call it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .agent_client import GuestAgent
from .exit_hooks import on_exit
from .ioloop import on_io_loop
from .kernel_vm import KernelPlan
from .quota import Limits
from .template import TemplateBounds, prepared_vm
from .vm.base import Vm, VmBackend
from .vm.process import reap_orphans

log = logging.getLogger("smol_kernel.pool")

RETRY_SECONDS = 30.0  # after a failed refill
MAX_FAILURES = 3  # in a row, then the plan's pool stays empty until asked for again
# Configurations kept warm at once, and for how long after the last start asked for one:
# with share_cwd every notebook folder is a configuration of its own.
MAX_PLANS = 8
PLAN_IDLE_SECONDS = 24 * 3600.0


@dataclass
class PooledVm:
    vm: Vm
    agent: GuestAgent
    plan: KernelPlan
    prepared_at: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return (
            self.vm.poll() is None
            and not self.agent.closed.is_set()
            and not self.agent.kernel_exited.is_set()
        )

    async def close(self) -> None:
        await self.agent.close()
        await self.vm.close()


@dataclass
class _Fill:
    """One refill in progress. Stopping it kills its VM rather than cancelling the task:
    a cancelled backend start could lose a process spawned in a worker thread."""

    plan: KernelPlan
    log: logging.Logger | logging.LoggerAdapter
    task: asyncio.Task | None = None
    vm: Vm | None = None
    stopped: bool = False

    def on_vm(self, vm: Vm) -> None:
        self.vm = vm
        vm.set_label("", pooled=True)
        if self.stopped:
            vm.kill()

    def stop(self) -> None:
        self.stopped = True
        if self.vm is not None:
            self.vm.kill()


@dataclass
class _Want:
    backend: VmBackend
    size: int
    ttl: float
    boot_timeout: float
    log: logging.Logger | logging.LoggerAdapter = log
    limits: Limits = field(default_factory=Limits)  # the kernelspec's own caps
    template_bounds: TemplateBounds = field(default_factory=TemplateBounds)
    failures: int = 0
    retry_at: float = 0.0
    asked: float = field(default_factory=time.monotonic)  # the last start that asked


class WarmPool:
    def __init__(self) -> None:
        self._wants: dict[KernelPlan, _Want] = {}
        self._ready: dict[KernelPlan, list[PooledVm]] = {}
        self._filling: _Fill | None = None
        self._cold_starts = 0
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self.refills = 0  # VMs booted for the pool (for tests and metrics)
        self.enabled = True  # False: want() is ignored (one-shot users, interpreter exit)
        # Asked before a refill boots: None to go ahead, else why not (quotas).
        self.admit: Callable[[KernelPlan], str | None] = lambda plan: None
        self._closing: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- the public side
    def want(
        self, plan: KernelPlan, backend: VmBackend, size: int, ttl: float, boot_timeout: float,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        limits: Limits | None = None, template_bounds: TemplateBounds | None = None,
    ) -> None:  # fmt: skip
        """Keep ``size`` VMs prepared for ``plan`` (0 drops the plan's pool). What happens
        to the plan's VMs is logged to ``logger`` (the Jupyter app's, so it shows);
        ``limits`` are the kernelspec's own caps, which refills of this plan respect, and
        ``template_bounds`` what a template built for a refill tidies to."""
        if size <= 0 or not self.enabled:
            if self._wants.pop(plan, None) is not None:
                self._wake.set()
            return
        old = self._wants.get(plan)
        self._wants[plan] = want = _Want(backend, size, ttl, boot_timeout, logger or log,
                                         limits or Limits(),
                                         template_bounds or TemplateBounds())  # fmt: skip
        if old is None or (old.size, old.ttl) != (size, ttl) or old.failures:
            want.log.info("warm pool: keeping %d VM(s) ready for %s", size, plan.describe())
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        self._wake.set()

    async def claim(self, plan: KernelPlan, deadline: float) -> PooledVm | None:
        """A prepared VM for ``plan``, now its caller's alone; None if there is none."""
        while ready := self._ready.get(plan):
            pooled = ready.pop(0)
            if pooled.alive():
                self._wake.set()  # refill
                return pooled
            await pooled.close()
        if self._filling and self._filling.plan == plan and self._filling.task:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(
                    asyncio.shield(self._filling.task), max(0.0, deadline - time.monotonic())
                )
            ready = self._ready.get(plan)
            if ready:
                self._wake.set()
                return ready.pop(0)
        return None

    def limits_for(self, plan: KernelPlan) -> Limits:
        """The caps of the kernelspec that asked for ``plan``'s pool."""
        want = self._wants.get(plan)
        return want.limits if want is not None else Limits()

    def why_miss(self, plan: KernelPlan) -> str:
        want = self._wants.get(plan)
        if want is None:
            return "no pool for this configuration"
        if want.failures:
            return f"refilling the pool failed {want.failures} time(s) (see the log)"
        return "no prepared VM for this configuration yet"

    @contextlib.asynccontextmanager
    async def cold_start(self) -> AsyncIterator[None]:
        """Around a cold start: no refill competes with it for CPU."""
        self._cold_starts += 1
        try:
            if (fill := self._filling) is not None and not fill.stopped:
                fill.log.info("warm pool: refill stopped for a cold start (retried after it)")
                fill.stop()
            yield
        finally:
            self._cold_starts -= 1
            self._wake.set()

    def ready_count(self, plan: KernelPlan | None = None) -> int:
        if plan is not None:
            return len(self._ready.get(plan, ()))
        return sum(len(v) for v in self._ready.values())

    @property
    def filling(self) -> KernelPlan | None:
        return self._filling.plan if self._filling else None

    @property
    def filling_vm(self) -> Vm | None:
        """The VM a refill is booting right now, once it exists."""
        return self._filling.vm if self._filling else None

    def memory(self) -> list[int]:
        """memory_mib of every pooled VM, ready or booting (they count against quotas)."""
        ready = [p.plan.memory_mib for v in self._ready.values() for p in v]
        fill = self._filling
        return ready + ([fill.plan.memory_mib] if fill and not fill.stopped else [])

    def nudge(self) -> None:
        """Look again now (e.g. a kernel ended and a quota has room for a refill)."""
        self._wake.set()

    def give_way_now(self, keep: KernelPlan | None = None) -> bool:
        """Kill one pooled VM, or stop the refill, to make room (a ``keep`` plan's VMs go
        last); its runtime dir is removed in the background. False if there was none."""
        plans = sorted(self._ready, key=lambda p: p == keep)
        for plan in plans:
            if ready := self._ready.get(plan):
                pooled = ready.pop()
                if not ready:
                    del self._ready[plan]
                pooled.vm.kill()
                task = asyncio.ensure_future(pooled.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                return True
        if (fill := self._filling) is not None and not fill.stopped:
            fill.log.info("warm pool: refill stopped to stay within a quota")
            fill.stop()
            return True
        return False

    def ready_vms(self, plan: KernelPlan | None = None) -> list[Vm]:
        return [p.vm for k, ready in self._ready.items() if plan in (None, k) for p in ready]

    async def close(self) -> None:
        """Stop refilling and close every pooled VM."""
        self._wants.clear()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(BaseException):
                await self._runner
            self._runner = None
        if (fill := self._filling) is not None and fill.task is not None:
            fill.stop()
            with contextlib.suppress(BaseException):
                await fill.task
        for ready in self._ready.values():
            for pooled in ready:
                await pooled.close()
        self._ready.clear()

    # ---------------------------------------------------------------- the background side
    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                next_check = await self._tend()
            except Exception:  # keep tending; a broken VM must not end the pool
                log.exception("warm pool: tending failed")
                next_check = RETRY_SECONDS
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), next_check)

    async def _tend(self) -> float:
        """Drop dead, expired and unwanted VMs; start one refill if one is due. Returns
        seconds until the next expiry or retry."""
        now = time.monotonic()
        next_check = 3600.0
        by_age = sorted(self._wants, key=lambda p: self._wants[p].asked, reverse=True)
        for i, plan in enumerate(by_age):
            if i >= MAX_PLANS or now - self._wants[plan].asked > PLAN_IDLE_SECONDS:
                self._wants[plan].log.info("warm pool: no longer kept for %s (not started "
                                           "lately)", plan.describe())  # fmt: skip
                del self._wants[plan]
        for plan, ready in list(self._ready.items()):
            want = self._wants.get(plan)
            for pooled in list(ready):
                expired = want is None or now - pooled.prepared_at >= want.ttl
                if expired or not pooled.alive():
                    ready.remove(pooled)
                    if want is not None and pooled.alive():
                        want.log.info("warm pool: recycling VM %s (pool_ttl)", pooled.vm.id)
                    await pooled.close()
                else:
                    next_check = min(next_check, pooled.prepared_at + want.ttl - now)
            if not ready:
                del self._ready[plan]
        if self._filling is not None or self._cold_starts:
            return next_check
        for plan, want in self._wants.items():
            if len(self._ready.get(plan, ())) >= want.size or want.failures >= MAX_FAILURES:
                continue
            if want.retry_at > now:
                next_check = min(next_check, want.retry_at - now)
                continue
            if self.admit(plan) is not None:  # a quota is full: check again later
                next_check = min(next_check, RETRY_SECONDS)
                continue
            fill = _Fill(plan, want.log)
            self._filling = fill
            fill.task = asyncio.ensure_future(self._fill(fill, want))
            break
        return max(0.05, next_check)

    async def _fill(self, fill: _Fill, want: _Want) -> None:
        plan = fill.plan
        try:
            await asyncio.to_thread(reap_orphans)  # a crashed owner's VMs, before ours
            vm, agent, _ = await prepared_vm(
                plan, want.backend, time.monotonic() + want.boot_timeout, on_vm=fill.on_vm,
                logger=want.log, bounds=want.template_bounds,
            )  # fmt: skip
        except Exception as e:
            if fill.stopped:
                return
            want.failures += 1
            want.retry_at = time.monotonic() + RETRY_SECONDS
            want.log.warning("warm pool: booting a VM for %s failed: %s", plan.describe(), e)
            return
        finally:
            self._filling = None
            self._wake.set()
        want.failures = 0
        self.refills += 1
        if fill.stopped or plan not in self._wants:  # killed, or dropped while it booted
            await agent.close()
            await vm.close()
            return
        vm.set_label("", pooled=True, ready=True)
        self._ready.setdefault(plan, []).append(PooledVm(vm, agent, plan))
        want.log.info("warm pool: VM %s ready (%s)", vm.id, plan.describe())


_pool: WarmPool | None = None


def warm_pool() -> WarmPool:
    """This process's pool (use it on the io loop)."""
    global _pool
    if _pool is None:
        _pool = WarmPool()
    return _pool


async def wait_for_pool(predicate: Callable[[WarmPool], bool], timeout: float = 300) -> None:
    """Wait, from any event loop, until ``predicate(warm_pool())`` holds (it is evaluated on
    the io loop), e.g. ``lambda pool: pool.ready_count() >= 1``. TimeoutError otherwise."""

    async def check() -> bool:
        return bool(predicate(warm_pool()))

    deadline = time.monotonic() + timeout
    while not await on_io_loop(check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"warm pool condition not met within {timeout:.0f}s")
        await asyncio.sleep(0.5)


def _stop_refills() -> None:
    """At exit no refill may start a VM (the VMs themselves are closed in the next stage,
    ``close_vms``)."""
    if _pool is not None:
        _pool.enabled = False
        _pool._wants.clear()
        if _pool._filling is not None:
            _pool._filling.stop()


on_exit("stop_refills", _stop_refills)
