"""A kernel's plan: what its VM will be, checked before any VM exists, and its place
under the quotas.

``KernelPlanner`` turns a provisioner's settings into a ``KernelPlan``: the guest's
environment (fixed per configuration, and per kernel), its shares, its allow-list, and the
backend the check chose with the isolation it found. It reserves the plan's memory against
the quotas (``quota.py``; pooled VMs give way first). It reads the settings and the
kernel's state (``kernel_state.py``), and keeps no state of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

from . import metrics, quota
from .errors import KernelStartError
from .guest import protocol as P
from .kernel_state import KernelState
from .kernel_vm import PER_KERNEL_ENV, KernelPlan
from .pool import warm_pool
from .settings import KernelSettings, SettingError, check_network, network_on
from .template import TemplateBounds
from .vm.select import Selection, select_backend
from .vm.share import Share, ShareError, check_shares, parse_share


class KernelPlanner:
    """Plans the VM of one provisioner's kernel (see the module docstring)."""

    def __init__(self, settings: KernelSettings, state: KernelState,
                 server_config: Mapping[str, Any]) -> None:  # fmt: skip
        self.settings = settings  # read only
        self.state = state
        self.server_config = server_config  # the server's (not the kernelspec's) config

    def split_env(
        self, spec_env: dict | None, host_env: dict
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The guest's environment: fixed for this configuration, and per kernel. The
        kernelspec's values go in literally: jupyter_client fills ``${VAR}`` from the host's
        environment, which would hand a host secret to the VM."""
        env = {"PATH": P.GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "SHELL": "/bin/sh"}
        for name, value in (spec_env or {}).items():
            env[str(name)] = str(value)
        per_kernel = {}
        if session := host_env.get("JPY_SESSION_NAME"):  # the notebook: its name, not where
            per_kernel["JPY_SESSION_NAME"] = os.path.basename(str(session))  # it is on the host
        if self.state.kernel_id:
            per_kernel["KERNEL_ID"] = self.state.kernel_id
        for name in PER_KERNEL_ENV:  # a kernelspec value is still per kernel
            if name in env:
                per_kernel.setdefault(name, env.pop(name))
        return env, per_kernel

    def check_network(self) -> None:
        s = self.settings
        try:
            check_network(s.allow_hosts, s.private_answer_ranges, s.dns_servers)
        except SettingError as e:
            raise KernelStartError(
                f"cannot start a {self.state.display_name} kernel: {e}"
            ) from None

    def resolve_shares(self, host_cwd: str | None) -> tuple[tuple[Share, ...], str]:
        """Parse ``shares`` and ``share_cwd`` now, so bad ones fail before any VM boots."""
        shares = []
        allow_home = self.settings.allow_home_share
        try:
            for text in self.settings.shares:
                shares.append(parse_share(text, host_cwd, allow_home))
            if self.settings.share_cwd != "off":
                text = f"{host_cwd or '.'}:{self.settings.cwd_guest_path}:{self.settings.share_cwd}"
                shares.append(parse_share(text, allow_home=allow_home))
            check_shares(shares)
        except ShareError as e:
            raise KernelStartError(
                f"cannot start a {self.state.display_name} kernel: {e}"
            ) from None
        s = self.settings
        cwd = s.guest_cwd or (shares[-1].guest if s.share_cwd != "off" else "/root")
        return tuple(shares), cwd

    def limits(self) -> quota.Limits:
        """The caps for this kernel: the server's own settings (config files, command line,
        MEM_LIMIT), which no kernelspec can lift, tightened by this kernelspec's. Also
        records the server's in the ledger and makes the pool ask it before each refill."""
        conf = self.server_config.get("SmolVMProvisioner", {})  # not the kernelspec's metadata

        def server_value(name: str, default: int) -> int:
            try:
                return int(conf.get(name, default))
            except (TypeError, ValueError):
                return default

        book, pool = quota.ledger(), warm_pool()
        book.server = quota.Limits(
            server_value("max_vms", 0),
            server_value("max_total_memory_mib", self.settings._default_max_total_memory_mib()),
        )
        pool.admit = lambda p: book.refusal(
            pool.memory(), p.memory_mib, book.server.tighter(pool.limits_for(p))
        )
        s = self.settings
        return book.server.tighter(quota.Limits(s.max_vms, s.max_total_memory_mib))

    def template_bounds(self) -> TemplateBounds:
        s = self.settings
        return TemplateBounds(s.max_template_disk_mib, s.template_max_idle_days)

    def reserve(self, plan: KernelPlan) -> None:
        """Count this kernel's VM against the quotas, closing pooled VMs if that makes
        room; QuotaExceeded (HTTP 403) if it cannot."""
        book, pool = quota.ledger(), warm_pool()
        limits = self.limits()

        def why_not() -> str | None:
            memory = pool.memory()
            if pool.ready_count(plan):  # claiming it: already counted
                memory.remove(plan.memory_mib)
            return book.refusal(memory, plan.memory_mib, limits)

        while (why := why_not()) is not None:
            if not pool.give_way_now(keep=plan):
                metrics.quota_refused()
                self.state.log.warning("kernel %s: refused: %s", self.state.shown_id, why)
                raise quota.QuotaExceeded(f"cannot start a {self.state.display_name} kernel: {why}")
        book.kernels[id(self.state)] = plan.memory_mib

    async def select_backend(self) -> Selection:
        writable = any(not share.read_only for share in self.state.shares)
        selection = await asyncio.to_thread(
            select_backend, self.settings.backend, self.settings.image,
            self.settings.require_hardware_isolation, writable,
        )  # fmt: skip
        if selection.backend is None:
            assert selection.error is not None
            raise KernelStartError(
                f"cannot start a {self.state.display_name} kernel: {selection.error}. "
                "Run 'smol-kernel doctor' for details."
            )
        assert selection.status is not None and selection.status.isolation is not None
        return selection

    def plan(self, selection: Selection) -> KernelPlan:
        assert selection.backend is not None and selection.status is not None
        env = dict(self.state.guest_env)
        env["SMOL_KERNEL_ISOLATION"] = str(selection.status.isolation)
        env["SMOL_KERNEL_BACKEND"] = selection.backend.name
        return KernelPlan(
            backend=selection.backend.name,
            image=self.settings.image,
            vcpus=self.settings.vcpus,
            memory_mib=self.settings.memory_mib,
            disk_mib=self.settings.disk_mib,
            network=network_on(self.settings.network, self.settings.allow_hosts),
            dns=tuple(self.settings.dns_servers),
            allow_hosts=tuple(self.settings.allow_hosts),
            private_answers=tuple(self.settings.private_answer_ranges),
            shares=self.state.shares,
            argv=tuple(self.state.guest_argv),
            env=tuple(sorted(env.items())),
            cwd=self.state.cwd,
            max_processes=self.settings.max_processes,
            debugger=self.settings.debugger,
        )

    def why_not_pooled(self, plan: KernelPlan, connection: dict) -> str | None:
        if self.settings.pool_size <= 0:
            return "pool_size is 0"
        if not plan.two_step:
            return "the kernelspec argv is not 'python3 -m ipykernel_launcher ...'"
        return None
