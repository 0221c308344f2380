"""SmolVMProvisioner: a jupyter_client kernel provisioner that runs each kernel in a microVM.

Contract (what jupyter_client can rely on):

* ``launch_kernel`` boots a fresh VM, starts the kernelspec's ``argv`` inside it, waits until
  the kernel's five ports answer in the guest, then relays them on the host ports of the
  connection file. It returns only when the kernel is reachable, or raises with the guest
  console tail; on failure nothing is left running.
* Nothing ever runs the kernel on the host: if no backend can run a VM, launch fails.
* The guest environment is the kernelspec's ``env`` plus a few fixed variables
  (``SMOL_KERNEL_ISOLATION`` among them); the host's environment never reaches the guest.
* ``send_signal(SIGINT)`` interrupts the kernel's process group in the guest; SIGKILL and
  ``kill()`` stop the whole VM. ``poll()`` reports a kernel that exited in the guest at once
  (the agent then powers the VM off), so the autorestarter replaces it with a fresh VM.
* ``cleanup()`` is idempotent: VM, helpers, sockets and runtime dir are gone afterwards.

Settings are traitlets: set them in a Jupyter config file (``c.SmolVMProvisioner.memory_mib
= 1024``) or per kernelspec in ``metadata.kernel_provisioner.config``, which wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import weakref
from typing import Any

import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Bool, Enum, Float, Integer, List, Unicode, default

from . import checkpoint as store
from . import metrics, quota, template
from .agent_client import GuestAgent
from .checkpoint import Checkpoint
from .exit_hooks import on_exit
from .guest import protocol as P
from .ioloop import on_io_loop
from .kernel_control import KernelControl
from .kernel_vm import PER_KERNEL_ENV, KernelPlan, KernelStartError, boot_kernel_vm, claim
from .message_pump import MessageGate
from .output_policy import OutputPolicy
from .paths import RuntimeDirError
from .pool import warm_pool
from .relay import KernelRelay
from .shown import escaped
from .start_errors import ReadableStartError
from .timeline import Timeline, finish_restore, restore_vm, resume
from .vm.allowlist import AllowList, AllowListError, check_cidr
from .vm.base import Vm, VmBackend, VmError
from .vm.network import egress_summary, read_egress_log
from .vm.process import RuntimeDir, kill_vm_dir, owner_user, proc_start_time, reap_orphans
from .vm.qemu import QemuBackend
from .vm.select import BACKENDS, Selection, select_backend
from .vm.share import Share, ShareError, check_shares, parse_share

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLIENT_RCVHWM = 1  # messages a client socket of a smolvm kernel queues (see bound_client_queues)


__all__ = ["KernelStartError", "SmolVMProvisioner"]


class SmolVMProvisioner(LocalProvisioner):  # type: ignore[misc]
    """Runs the kernel in its own microVM (libkrun or QEMU), relaying its channels."""

    backend = Enum(
        BACKENDS,
        default_value="auto",
        config=True,
        help="VM backend: auto (libkrun, else QEMU with KVM, else QEMU with TCG), qemu, "
        "or libkrun.",
    )
    image = Unicode(
        "default", config=True, help="Guest image name (build it: smol-kernel image build)."
    )
    vcpus = Integer(1, config=True, help="Virtual CPUs of the kernel VM.")
    memory_mib = Integer(1024, config=True, help="Guest memory of the kernel VM, in MiB.")
    disk_mib = Integer(
        2048, config=True, help="Size cap of the VM's writable disk (sparse on the host), MiB."
    )
    max_processes = Integer(
        1024,
        config=True,
        help="Most tasks (processes and threads) the kernel and what it starts may have in "
        "the guest, 0 for the guest kernel's own limit. A fork bomb then fails with "
        "'Cannot fork' and the kernel stays usable.",
    )
    startup_timeout = Float(
        180.0,
        config=True,
        help="Seconds to wait for the VM to boot and the kernel to answer; the guest "
        "console tail is shown when it expires.",
    )
    require_hardware_isolation = Bool(
        False,
        config=True,
        help="Refuse to start unless the VM gets hardware virtualization (kvm or hvf); "
        "TCG software emulation is not a security boundary.",
    )
    guest_cwd = Unicode(
        "",
        config=True,
        help="Working directory of the kernel in the guest. Empty: the shared notebook "
        "folder when share_cwd is on, else /root.",
    )
    max_lifetime = Float(
        0.0,
        config=True,
        help="Stop the kernel's VM this many seconds after its kernel was ready (0: no "
        "limit); boot time does not count. The kernel is then reported dead, like any other "
        "exit.",
    )

    debugger = Bool(
        False,
        config=True,
        help="Load debugpy in the guest so JupyterLab's debugger works (smol-kernel install "
        "--debugger also sets the kernelspec's metadata.debugger). Off: the kernel starts "
        "faster and reports no debugger.",
    )
    pool_size = Integer(
        1,
        config=True,
        help="Warm pool: VMs this server process keeps booted, with the kernel imported and "
        "initialised, for each distinct kernel configuration that was started (or is "
        "listed when the server starts, with the smol_kernel server extension). A start "
        "takes one (instant); a refill boots in the background, never during a cold start. "
        "0: no pool, nothing runs in the background.",
    )
    max_vms = Integer(
        0,
        config=True,
        help="Most kernel VMs this server process runs at once, counting starting, running "
        "and warm-pool VMs (the pool gives way first); 0: no cap. A start over it fails "
        "with HTTP 403 and a message naming this setting.",
    )
    max_total_memory_mib = Integer(
        config=True,
        help="Most guest memory (MiB) this server process's kernel VMs may have in total, "
        "counted like max_vms; 0: no cap. Default: the spawner's MEM_LIMIT (JupyterHub sets "
        "it from Spawner.mem_limit), else 0.",
    )

    @default("max_total_memory_mib")
    def _default_max_total_memory_mib(self) -> int:
        try:
            return int(os.environ.get("MEM_LIMIT", "0")) // (1 << 20)
        except ValueError:
            return 0

    pool_ttl = Float(
        3600.0,
        config=True,
        help="Seconds a pooled VM may wait unused before it is replaced by a fresh one.",
    )

    network = Bool(
        False,
        config=True,
        help="Give the kernel outbound network (TCP, UDP, DNS) through a per-VM passt proxy. "
        "Off: the guest has loopback only. Even on, the host's loopback (and so the Jupyter "
        "server) stays unreachable.",
    )
    dns_servers = List(
        Unicode(),
        default_value=[],
        config=True,
        help="With network on: IPv4 DNS servers the guest asks directly (they must not be "
        "host addresses, which the guest cannot reach). Empty: the host's resolver, "
        "forwarded by passt.",
    )
    allow_hosts = List(
        Unicode(),
        default_value=[],
        config=True,
        help="The only destinations the kernel may reach, which turns the network on for "
        "them: host names (pypi.org), subdomains (*.example.com), IPv4 addresses and CIDR "
        "ranges, each optionally with :PORT or :PORT-PORT. A name's addresses open when the "
        "guest resolves it; other names get NXDOMAIN and other addresses a refusal. The host "
        "and local ranges stay blocked. Empty: network decides (all or nothing).",
    )
    private_answer_ranges = List(
        Unicode(),
        default_value=[],
        config=True,
        help="With allow_hosts: private or other non-global IPv4 ranges (CIDR) a DNS answer "
        "for an allowed name may open, e.g. 10.20.0.0/16 for an internal API. Empty: a name "
        "opens only globally routable addresses, so an allowed name pointed at a LAN "
        "address (DNS rebinding) opens nothing. Address entries in allow_hosts are not "
        "limited by this.",
    )
    shares = List(
        Unicode(),
        default_value=[],
        config=True,
        help="Host folders to show in the guest, as HOST:GUEST[:ro|rw] (read-only unless "
        ":rw). A relative HOST is relative to the notebook's folder.",
    )
    share_cwd = Enum(
        ["off", "ro", "rw"],
        default_value="off",
        config=True,
        help="Share the folder the kernel starts in (the notebook's folder) at cwd_guest_path "
        "and start the kernel there: off, ro (read-only) or rw.",
    )
    cwd_guest_path = Unicode(
        "/work", config=True, help="Where share_cwd mounts the notebook's folder in the guest."
    )
    allow_home_share = Bool(
        False,
        config=True,
        help="Allow a read-only share of the home folder itself. Everything in it becomes "
        "readable in the VM: ~/.ssh keys, cloud credentials, Jupyter's tokens and history "
        "included. Off: the home folder, and any folder of secrets, is refused even "
        "read-only.",
    )
    trusted_outputs = Bool(
        False,
        config=True,
        help="Show the kernel's outputs as the kernel sent them, JavaScript and all. This "
        "lets the code in the VM run script in your browser as you (and, through the "
        "Jupyter server's API, start programs on the host). Off: HTML, Markdown and SVG are "
        "sanitized and script outputs are replaced by a note (docs/security.md).",
    )
    iopub_backlog_mib = Integer(
        256,
        config=True,
        help="Most output (MiB) the host holds for this kernel's clients that they have not "
        "taken yet; over it, output messages are dropped and each client that missed some "
        "is told so in a stream line.",
    )

    restore_on_crash = Bool(
        False,
        config=True,
        help="When the kernel dies (out of memory, a crash, a stuck extension killed), the "
        "automatic restart resumes from the kernel's latest checkpoint instead of an empty "
        "kernel, and says so in a stream line.",
    )
    max_checkpoints = Integer(
        5,
        config=True,
        help="Checkpoints a kernel keeps; the oldest one not kept explicitly is removed "
        "when a new one is saved (0: no cap).",
    )
    checkpoint_interval = Float(
        5.0,
        config=True,
        help="Seconds between two checkpoints the kernel itself asks for (%%checkpoint); "
        "the host refuses the ones in between.",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connection_info = {}  # the base class shares one dict between all instances
        self.vm: Vm | None = None
        self.agent: GuestAgent | None = None
        self.relay: KernelRelay | None = None
        self.isolation: str | None = None
        self.ready_at: float | None = None  # time.monotonic() when the kernel was ready
        self.start_kind: str | None = None  # "pooled" or "cold", once launched
        self.plan: KernelPlan | None = None  # what the kernel's VM was booted as
        self.backend_name: str | None = None
        self._guest_env: dict[str, str] = {}  # without PER_KERNEL_ENV
        self._kernel_env: dict[str, str] = {}  # PER_KERNEL_ENV
        self._guest_argv: list[str] = []
        self._shares: tuple[Share, ...] = ()
        self._cwd = "/root"
        self._exit_status: int | None = None
        self._end_reason = "ended"  # why the kernel's VM went, for the audit line
        self._loaded: dict = {}  # state from load_provisioner_info (a VM we did not start)
        self.vm_backend: VmBackend | None = None  # what runs the kernel's VM, once launched
        self.timeline = Timeline(self)  # its checkpoints, rewinds and forks
        self._restore_from: Checkpoint | None = None  # a fork's source, for its first launch
        self._launches = 0
        self._crashed: str | None = None  # why the kernel died, when it was not asked to
        self._control = None  # the kernel's control socket server (smol-kernel checkpoint)
        self._finishing: asyncio.Future | None = None  # a restored kernel's first words

    @property
    def _shown_id(self) -> str:
        """The kernel id for log lines: a REST client chooses it, so escaped."""
        return escaped(self.kernel_id)

    # ------------------------------------------------------------------ launch
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        try:
            await asyncio.to_thread(reap_orphans)
        except RuntimeDirError as e:
            raise ReadableStartError(500, f"cannot start a kernel: {e}") from None
        bound_client_queues(self.parent)
        extra = list(kwargs.get("extra_arguments") or [])
        kwargs = await super().pre_launch(**kwargs)  # ports, connection file, curve keys
        if self._launches == 0:  # a restart of a fork is an ordinary restart
            self._restore_from = kwargs.pop("restore_from", None)
        kwargs.pop("restore_from", None)
        self._guest_env, self._kernel_env = self._split_env(kwargs.get("env") or {})
        self._guest_argv = list(self.kernel_spec.argv) + extra
        self._shares, self._cwd = self._resolve_shares(kwargs.get("cwd"))
        self._check_allow_hosts()
        return kwargs

    async def warm_up(self, cwd: str | None = None) -> str:
        """Fill the warm pool for this kernelspec's configuration now, before any kernel
        starts (the server extension calls this). Returns what it did, for the log."""
        if self.pool_size <= 0:
            return "pool_size is 0: no pool"
        self._guest_env, self._kernel_env = self._split_env(dict(os.environ))
        self._guest_argv = list(self.kernel_spec.argv)
        self._shares, self._cwd = self._resolve_shares(cwd)
        self._check_allow_hosts()
        return await on_io_loop(self._warm_up())

    async def _warm_up(self) -> str:
        selection = await self._select_backend()
        plan = self._plan(selection)
        if (why := self._why_not_pooled(plan, {})) is not None:
            return f"no pool: {why}"
        assert selection.backend is not None
        warm_pool().want(plan, selection.backend, self.pool_size, self.pool_ttl,
                         self.startup_timeout, self.log, self._limits())  # fmt: skip
        return f"keeping {self.pool_size} VM(s) ready ({plan.describe()})"

    def _split_env(self, host_env: dict) -> tuple[dict[str, str], dict[str, str]]:
        """The guest's environment: fixed for this configuration, and per kernel. The
        kernelspec's values go in literally: jupyter_client fills ``${VAR}`` from the host's
        environment, which would hand a host secret to the VM."""
        env = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "SHELL": "/bin/sh"}
        for name, value in (self.kernel_spec.env or {}).items():
            env[str(name)] = str(value)
        per_kernel = {}
        if session := host_env.get("JPY_SESSION_NAME"):  # the notebook: its name, not where
            per_kernel["JPY_SESSION_NAME"] = os.path.basename(str(session))  # it is on the host
        if self.kernel_id:
            per_kernel["KERNEL_ID"] = self.kernel_id
        for name in PER_KERNEL_ENV:  # a kernelspec value is still per kernel
            if name in env:
                per_kernel.setdefault(name, env.pop(name))
        return env, per_kernel

    def _check_allow_hosts(self) -> None:
        try:
            AllowList.parse(self.allow_hosts)
            for net in self.private_answer_ranges:
                check_cidr(net)
        except AllowListError as e:
            raise KernelStartError(
                f"cannot start a {self.kernel_spec.display_name} kernel: {e}"
            ) from None

    def _resolve_shares(self, host_cwd: str | None) -> tuple[tuple[Share, ...], str]:
        """Parse ``shares`` and ``share_cwd`` now, so bad ones fail before any VM boots."""
        shares = []
        allow_home = self.allow_home_share
        try:
            for text in self.shares:
                shares.append(parse_share(text, host_cwd, allow_home))
            if self.share_cwd != "off":
                text = f"{host_cwd or '.'}:{self.cwd_guest_path}:{self.share_cwd}"
                shares.append(parse_share(text, allow_home=allow_home))
            check_shares(shares)
        except ShareError as e:
            raise KernelStartError(
                f"cannot start a {self.kernel_spec.display_name} kernel: {e}"
            ) from None
        cwd = self.guest_cwd or (shares[-1].guest if self.share_cwd != "off" else "/root")
        return tuple(shares), cwd

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        try:
            return await on_io_loop(self._launch())
        except ReadableStartError:
            raise
        except KernelStartError as e:
            raise ReadableStartError(500, str(e)) from e

    def _limits(self) -> quota.Limits:
        """The caps for this kernel: the server's own settings (config files, command line,
        MEM_LIMIT), which no kernelspec can lift, tightened by this kernelspec's. Also
        records the server's in the ledger and makes the pool ask it before each refill."""
        conf = self.config.get("SmolVMProvisioner", {})  # not the kernelspec's metadata

        def server_value(name: str, default: int) -> int:
            try:
                return int(conf.get(name, default))
            except (TypeError, ValueError):
                return default

        book, pool = quota.ledger(), warm_pool()
        book.server = quota.Limits(
            server_value("max_vms", 0),
            server_value("max_total_memory_mib", self._default_max_total_memory_mib()),
        )
        pool.admit = lambda p: book.refusal(
            pool.memory(), p.memory_mib, book.server.tighter(pool.limits_for(p))
        )
        return book.server.tighter(quota.Limits(self.max_vms, self.max_total_memory_mib))

    def _reserve(self, plan: KernelPlan) -> None:
        """Count this kernel's VM against the quotas, closing pooled VMs if that makes
        room; QuotaExceeded (HTTP 403) if it cannot."""
        book, pool = quota.ledger(), warm_pool()
        limits = self._limits()

        def why_not() -> str | None:
            memory = pool.memory()
            if pool.ready_count(plan):  # claiming it: already counted
                memory.remove(plan.memory_mib)
            return book.refusal(memory, plan.memory_mib, limits)

        while (why := why_not()) is not None:
            if not pool.give_way_now(keep=plan):
                metrics.quota_refused()
                self.log.warning("kernel %s: refused: %s", self._shown_id, why)
                raise quota.QuotaExceeded(
                    f"cannot start a {self.kernel_spec.display_name} kernel: {why}"
                )
        book.kernels[id(self)] = plan.memory_mib

    async def _launch(self) -> KernelConnectionInfo:
        deadline = time.monotonic() + self.startup_timeout
        late = f"within {self.startup_timeout:.0f}s (startup_timeout)"
        self._exit_status = None
        selection = await self._select_backend()
        ci = self.connection_info
        relay = KernelRelay(
            str(ci.get("transport", "tcp")),
            str(ci.get("ip", "127.0.0.1")),
            {ch: int(ci[f"{ch}_port"]) for ch in P.CHANNEL_PORTS},  # type: ignore[call-overload]
            self._message_gate(),
        )
        relay.bind()
        self.relay = relay
        self.plan = plan = self._plan(selection)
        self.backend_name = plan.backend
        self.vm_backend = selection.backend
        try:
            self._reserve(plan)
        except BaseException:
            await relay.close()
            self.relay = None
            raise
        connection = _guest_connection(ci)
        self.start_kind = None
        t0 = time.monotonic()
        restore, announce = self._restore_source()
        try:
            if restore is not None and not await self._start_restored(
                restore, connection, deadline
            ):
                announce = None
            assert selection.backend is not None
            why_cold = self._why_not_pooled(plan, connection)
            if self.start_kind is None and why_cold is None:
                why_cold = await self._start_pooled(selection.backend, plan, connection,
                                                    deadline, late)  # fmt: skip
            if self.start_kind is None:
                await self._start_unpooled(selection.backend, plan, connection, deadline, late,
                                           why_cold)  # fmt: skip
            vm = self.vm
            assert vm is not None
            if self.isolation != dict(plan.env)["SMOL_KERNEL_ISOLATION"]:  # never misreport
                raise KernelStartError(
                    f"VM {vm.id} got isolation {self.isolation}, not the "
                    f"{dict(plan.env)['SMOL_KERNEL_ISOLATION']} the backend check found"
                )
            await relay.start_serving(vm.open_stream)
            assert self.agent is not None
            self.agent.on_kernel_request = self.timeline.on_kernel_request
            await self.vm_changed()
        except BaseException:
            await self._teardown()
            raise
        self._launches += 1
        self._crashed = None
        if announce is not None:  # a restored kernel says so once its clients are back
            self._finishing = asyncio.ensure_future(self._finish_restore(announce))
        self.ready_at = time.monotonic()
        self._end_reason = "ended"
        _running.add(self)
        metrics.kernel_started(self.start_kind or "cold", self.ready_at - t0)
        self._audit("kernel_start", start=self.start_kind, start_s=round(self.ready_at - t0, 2))
        if self.max_lifetime > 0:
            launch = self._launches
            asyncio.get_running_loop().call_later(self.max_lifetime, self._expire, launch)
        self.log.info(
            "kernel %s: ready in VM %s (%s start, %.1fs)",
            self._shown_id, vm.id, self.start_kind, self.ready_at - t0,
        )  # fmt: skip
        return self.connection_info

    def _message_gate(self) -> MessageGate:
        """The kernel's key, output policy and iopub cap, for the relay."""
        ci = self.connection_info
        if ci.get("curve_secretkey"):
            raise KernelStartError(
                f"cannot start a {self.kernel_spec.display_name} kernel with CurveZMQ "
                "encryption: the host reads what the kernel sends (output policy, memory "
                "bounds), which an end-to-end encrypted connection would hide. Use the "
                "default HMAC-signed connection (the channels stay on this host)."
            )
        key = ci.get("key") or b""
        return MessageGate(
            key=key.encode() if isinstance(key, str) else bytes(key),
            signature_scheme=str(ci.get("signature_scheme") or "hmac-sha256"),
            policy=None if self.trusted_outputs else OutputPolicy(),
            iopub_backlog=max(1, self.iopub_backlog_mib) << 20,
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
                self.log.info("kernel %s: building the template of %s (first start of this "
                              "configuration)", self._shown_id, plan.describe())  # fmt: skip
            async with pool.cold_start() if not built else contextlib.nullcontext():
                vm, self.agent, how = await template.prepared_vm(
                    plan, backend, deadline, self.kernel_id or "", self._adopt, self.log
                )
            self.log.info("kernel %s: %s VM %s (%s)", self._shown_id,
                          "restored clone" if how == "clone" else "booted", vm.id,
                          why_not_pooled)  # fmt: skip
            await claim(vm, self.agent, connection, self._kernel_env, deadline, late)
            self.start_kind = how
            return
        self.log.info("kernel %s: cold start (%s)", self._shown_id, why_cold or why_not_pooled)
        async with pool.cold_start():
            _, self.agent = await boot_kernel_vm(
                backend, plan, deadline, connection, self._kernel_env,
                label=self.kernel_id or "", on_vm=self._adopt, late=late,
            )  # fmt: skip
        self.start_kind = "cold"

    def _restore_source(self) -> tuple[Checkpoint | None, str | None]:
        """A checkpoint this launch restores instead of starting afresh (a fork's first
        launch; a restart after a crash with ``restore_on_crash``), and what the restored
        kernel says."""
        cp, self._restore_from = self._restore_from, None
        if cp is not None:
            return cp, (f"[smol-kernel: forked from checkpoint {cp.name} of kernel "
                        f"{cp.kernel_id}]")  # fmt: skip
        if self._crashed and self.restore_on_crash and self.kernel_id:
            saved = store.list_checkpoints(self.kernel_id)
            if saved:
                latest = saved[-1]
                return latest, (f"[smol-kernel: the kernel died ({self._crashed}); restored "
                                f"from its latest checkpoint, {latest.describe()}]")  # fmt: skip
            self.log.info("kernel %s: died (%s) with no checkpoint to restore",
                          self._shown_id, self._crashed)  # fmt: skip
        return None, None

    async def _start_pooled(
        self, backend: VmBackend, plan: KernelPlan, connection: dict, deadline: float,
        late: str,
    ) -> str | None:  # fmt: skip
        """Claim a VM of the warm pool (and keep the pool filled); None when the kernel
        runs in it, else why not."""
        pool = warm_pool()
        pool.want(plan, backend, self.pool_size, self.pool_ttl, self.startup_timeout, self.log,
                  self._limits())  # fmt: skip
        pooled = await pool.claim(plan, deadline)
        if pooled is None:
            return pool.why_miss(plan)
        self._adopt(pooled.vm)
        self.agent = pooled.agent
        pooled.vm.set_label(self.kernel_id or "")
        self.log.info(
            "kernel %s: claimed pooled VM %s (%s, isolation %s)",
            self._shown_id, pooled.vm.id, self.backend_name, self.isolation,
        )  # fmt: skip
        try:
            await claim(pooled.vm, pooled.agent, connection, self._kernel_env, deadline, late)
        except (KernelStartError, VmError) as e:  # it died while it waited
            await self._teardown(keep_relay=True)
            return f"the claimed VM {pooled.vm.id} failed: {str(e)[:200]}"
        self.start_kind = "pooled"
        return None

    async def _start_restored(self, cp: Checkpoint, connection: dict, deadline: float) -> bool:
        """Start the kernel from a checkpoint. False: a crash restore that failed (start
        afresh instead); a fork that cannot start from its checkpoint raises."""
        try:
            await self._restore(cp, connection, deadline)
            return True
        except (KernelStartError, VmError, OSError) as e:
            if cp.kernel_id != self.kernel_id:
                raise
            self.log.warning("kernel %s: not restored from checkpoint %s (%s): starting "
                             "afresh", self._shown_id, escaped(cp.name), e)  # fmt: skip
            await self._teardown(keep_relay=True)
            self.start_kind = None
            return False

    async def _restore(self, cp: Checkpoint, connection: dict, deadline: float) -> None:
        plan = self.plan
        assert plan is not None
        if (why := self.timeline.why_not_for(plan)) is not None:
            raise KernelStartError(f"cannot start from checkpoint {cp.name}: {why}")
        if cp.plan_key != self.timeline.plan_key():
            raise KernelStartError(
                f"cannot start from checkpoint {cp.name}: it was saved by a kernel of another "
                f"configuration ({cp.description}), or before the image or QEMU changed"
            )
        fork = cp.kernel_id != self.kernel_id
        vm, self.agent = await restore_vm(cp, plan, self.vm_backend, self.kernel_id or "",
                                          deadline, on_vm=self._adopt)  # fmt: skip
        await resume(self.agent, connection, self._kernel_env, reseed=fork)
        self.start_kind = "fork" if fork else "restored"
        self.log.info("kernel %s: VM %s restored from checkpoint %s of kernel %s",
                      self._shown_id, vm.id, escaped(cp.name), escaped(cp.kernel_id))  # fmt: skip

    async def _finish_restore(self, announce: str) -> None:
        """Let the restored kernel speak once a client listens (2 s at most: a kernel
        saved inside %checkpoint waits for this before it handles anything)."""
        agent, relay = self.agent, self.relay
        if agent is None or relay is None:
            return
        await relay.wait_for_listener(2.0)
        try:
            await finish_restore(agent, announce, None)
            self.log.info("kernel %s: told its clients: %s", self._shown_id, announce)
        except (VmError, TimeoutError) as e:
            self.log.warning("kernel %s: the restored kernel did not resume: %s",
                             self._shown_id, e)  # fmt: skip

    def guest_connection(self) -> dict:
        """What the guest kernel needs of this kernel's connection (its key)."""
        return _guest_connection(self.connection_info)

    async def vm_changed(self) -> None:
        """The kernel's VM is new (a launch or a rewind): its control socket moves."""
        if self._control is not None:
            await self._control.close()
            self._control = None
        if self.vm is not None and self.relay is not None:
            control = KernelControl(self, self.vm.runtime_dir)
            try:
                await control.start()
                self._control = control
            except OSError as e:
                self.log.warning("kernel %s: no control socket: %s", self._shown_id, e)

    # ------------------------------------------------------------------ checkpoints
    async def checkpoint(self, name: str | None = None, keep: bool = False) -> Checkpoint:
        """Save this kernel as it is now (it must be idle); see ``timeline.py``."""
        return await on_io_loop(self.timeline.checkpoint(name, keep))

    async def rewind(self, name: str) -> Checkpoint:
        """Bring this kernel back to checkpoint ``name``; clients stay connected."""
        return await on_io_loop(self.timeline.rewind(name))

    async def checkpoints(self) -> list[Checkpoint]:
        return await on_io_loop(_listed(self.timeline))

    async def fork_source(self, name: str | None = None) -> tuple[Checkpoint, bool]:
        """The checkpoint forks of this kernel start from (launch them with
        ``restore_from=``): ``name``, or one of the kernel now (True: a temporary one,
        remove it with ``checkpoint.remove`` once the forks run)."""
        return await on_io_loop(self.timeline.fork_source(name))

    async def _select_backend(self) -> Selection:
        selection = await asyncio.to_thread(
            select_backend, self.backend, self.image, self.require_hardware_isolation
        )
        if selection.backend is None:
            assert selection.error is not None
            raise KernelStartError(
                f"cannot start a {self.kernel_spec.display_name} kernel: {selection.error}. "
                "Run 'smol-kernel doctor' for details."
            )
        assert selection.status is not None and selection.status.isolation is not None
        return selection

    def _plan(self, selection: Selection) -> KernelPlan:
        assert selection.backend is not None and selection.status is not None
        env = dict(self._guest_env)
        env["SMOL_KERNEL_ISOLATION"] = str(selection.status.isolation)
        env["SMOL_KERNEL_BACKEND"] = selection.backend.name
        return KernelPlan(
            backend=selection.backend.name,
            image=self.image,
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            disk_mib=self.disk_mib,
            network=self.network or bool(self.allow_hosts),
            dns=tuple(self.dns_servers),
            allow_hosts=tuple(self.allow_hosts),
            private_answers=tuple(self.private_answer_ranges),
            shares=self._shares,
            argv=tuple(self._guest_argv),
            env=tuple(sorted(env.items())),
            cwd=self._cwd,
            max_processes=self.max_processes,
            debugger=self.debugger,
        )

    def _why_not_pooled(self, plan: KernelPlan, connection: dict) -> str | None:
        if self.pool_size <= 0:
            return "pool_size is 0"
        if not plan.two_step:
            return "the kernelspec argv is not 'python3 -m ipykernel_launcher ...'"
        return None

    def _adopt(self, vm: Vm) -> None:
        """``vm`` is this kernel's from now on (even while it boots: kill() reaches it)."""
        self.vm = vm
        self.isolation = str(vm.isolation)

    def _expire(self, launch: int) -> None:
        """The kernel of launch number ``launch`` has lived ``max_lifetime`` (a rewind
        changes its VM, not its age; a restart is a new launch)."""
        vm = self.vm
        if self._launches == launch and vm is not None and vm.poll() is None:
            self.log.warning(
                "kernel %s: max_lifetime of %.0fs reached, stopping VM %s",
                self._shown_id, self.max_lifetime, vm.id,
            )  # fmt: skip
            self._end_reason = "max_lifetime"
            vm.kill()

    def egress_log(self) -> dict | None:
        """What the network guard of the kernel's current VM logged (``vm/egress.py``):
        every destination tried, allowed or blocked; None without network."""
        vm, plan = self.vm, self.plan
        if vm is None or plan is None or not plan.network:
            return None
        return read_egress_log(vm.runtime_dir)

    def _audit_end(self, reason: str) -> None:
        global _egress_blocked_ended
        if self.ready_at is not None:
            lifetime = round(time.monotonic() - self.ready_at, 1)
            extra = {}
            if (log := self.egress_log()) is not None:
                extra["egress"] = egress_summary(log)
                _egress_blocked_ended += int(log.get("blocked", 0))
            self._audit("kernel_end", reason=reason, lifetime_s=lifetime, **extra)
            self.ready_at = None
        _running.discard(self)

    def _audit(self, event: str, **fields: Any) -> None:
        """One structured line per kernel start and end, for the operator's log."""
        plan = self.plan
        record = {
            "event": event,
            "user": owner_user(),
            "kernel_id": self.kernel_id,
            "vm_id": self.vm.id if self.vm else None,
            "backend": self.backend_name,
            "isolation": self.isolation,
            "vcpus": plan.vcpus if plan else None,
            "memory_mib": plan.memory_mib if plan else None,
            "network": plan.network if plan else None,
            "shares": [str(s) for s in plan.shares] if plan else [],
            **fields,
        }
        self.log.info("smol-kernel audit: %s", json.dumps(record))

    # ------------------------------------------------------------------ process API
    @property
    def has_process(self) -> bool:
        return self.vm is not None or bool(self._loaded)

    async def poll(self) -> int | None:
        return await on_io_loop(self._poll())

    async def _poll(self) -> int | None:
        if self.vm is None:
            if self._loaded:
                return None if self._loaded_alive() else 0
            return self._exit_status if self._exit_status is not None else 0
        status = None
        if self.agent is not None and self.agent.kernel_exited.is_set():
            status = self.agent.kernel_exit_status
        elif (vm_status := self.vm.poll()) is not None:
            status = vm_status if vm_status != 0 else 1  # the VM ended, its kernel did not
        if status is not None and self._end_reason == "ended" and not self._crashed:
            self._crashed = f"exit status {status}"  # nobody asked it to go
        return status

    async def wait(self) -> int | None:
        return await on_io_loop(self._wait())

    async def _wait(self) -> int | None:
        while (status := await self._poll()) is None:
            await asyncio.sleep(0.1)
        self._exit_status = status
        if self._end_reason == "ended":
            self._end_reason = f"kernel exited ({status})"
        await self._teardown()
        return status

    async def send_signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            await self.kill()
            return
        await on_io_loop(self._signal(signum))

    async def _signal(self, signum: int) -> None:
        if self.agent is None or self.vm is None or self.vm.poll() is not None:
            return  # a dead kernel has nothing to interrupt; the manager expects no error
        with contextlib.suppress(VmError, TimeoutError, ProcessLookupError):
            await self.agent.request(P.OP_SIGNAL, signum=int(signum), timeout=5.0)

    async def guest_request(self, op: str, timeout: float, **fields: Any) -> dict:
        """Send one agent request (files, commands: ``guest/protocol.py``) to this kernel's
        VM and return the reply. Raises AgentError (with ``errno`` when the guest hit an
        OSError), or VmError when no VM is running."""
        return await on_io_loop(self._guest_request(op, timeout, fields))

    async def _guest_request(self, op: str, timeout: float, fields: dict) -> dict:
        if self.agent is None or self.vm is None or self.vm.poll() is not None:
            raise VmError("the kernel's VM is not running")
        return await self.agent.request(op, timeout=timeout, **fields)

    async def kill(self, restart: bool = False) -> None:
        if self._end_reason == "ended":
            self._end_reason = "restart" if restart else "killed"
        if self.vm is not None:
            self.vm.kill()
        elif self._loaded:
            self._kill_loaded()

    async def terminate(self, restart: bool = False) -> None:
        await on_io_loop(self._terminate())

    async def _terminate(self) -> None:
        if self.vm is None:
            if self._loaded:
                self._kill_loaded()
            return
        if self.agent is None:
            self.vm.terminate()
            return
        try:
            await self.agent.request(P.OP_SIGNAL, signum=signal.SIGTERM, timeout=5.0)
        except (VmError, TimeoutError):
            self.vm.terminate()

    async def cleanup(self, restart: bool = False) -> None:
        await on_io_loop(self._teardown())
        if self._loaded:
            self._kill_loaded()
        if not restart and self.kernel_id and self._launches:
            for cp in await asyncio.to_thread(store.remove_kernel, self.kernel_id):
                self.log.info("kernel %s: removed checkpoint %s with its kernel",
                              self._shown_id, escaped(cp.name))  # fmt: skip
        await super().cleanup(restart=restart)

    async def _teardown(self, keep_relay: bool = False) -> None:
        """Stop relaying, close the agent, destroy the VM. Idempotent."""
        relay, agent, vm = None if keep_relay else self.relay, self.agent, self.vm
        if not keep_relay:
            self.relay = None
            if quota.ledger().kernels.pop(id(self), None) is not None:
                warm_pool().nudge()  # a refill a quota held back may fit now
        if vm is not None and self.ready_at is not None and not keep_relay:
            self._audit_end(self._end_reason)
        self.agent = self.vm = None
        if self._control is not None:
            await self._control.close()
            self._control = None
        if relay is not None:
            await relay.close()
        if agent is not None:
            await agent.close()
        if vm is not None:
            await vm.close()

    async def shutdown_requested(self, restart: bool = False) -> None:
        """The kernel got shutdown_request; when it exits the agent powers the VM off."""
        self._end_reason = "restart" if restart else "shutdown"

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, 10.0)  # an emulated guest needs longer to exit cleanly

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, 30.0)

    def resolve_path(self, path_str: str) -> str | None:
        """Map a guest path inside a share to the host path; anything else is guest-only."""
        import posixpath

        guest = posixpath.normpath(posixpath.join(self._cwd, path_str))
        for share in self._shares:
            if guest == share.guest or guest.startswith(share.guest + "/"):
                host = os.path.realpath(share.host + guest[len(share.guest) :])
                inside = host == share.host or host.startswith(share.host + os.sep)
                return host if inside and os.path.exists(host) else None
        return None

    # ------------------------------------------------------------------ persistence
    async def get_provisioner_info(self) -> dict:
        info = await super().get_provisioner_info()
        vm = self.vm
        info.update(
            {
                "vm_id": vm.id if vm else self._loaded.get("vm_id"),
                "runtime_dir": str(vm.runtime_dir) if vm else self._loaded.get("runtime_dir"),
                "vmm_pid": vm.pid if vm else self._loaded.get("vmm_pid"),
                "vmm_start": proc_start_time(vm.pid) if vm and vm.pid else None,
                "isolation": self.isolation,
                "backend": self.backend_name,
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.isolation = provisioner_info.get("isolation")
        self.backend_name = provisioner_info.get("backend")
        if provisioner_info.get("runtime_dir"):
            self._loaded = {
                k: provisioner_info.get(k) for k in ("vm_id", "runtime_dir", "vmm_pid", "vmm_start")
            }

    def _loaded_alive(self) -> bool:
        pid, start = self._loaded.get("vmm_pid"), self._loaded.get("vmm_start")
        return bool(pid) and proc_start_time(pid) == start

    def _kill_loaded(self) -> None:
        """Cull a VM recorded by a previous server (we cannot relay to it: kill it)."""
        from pathlib import Path

        rt = RuntimeDir(Path(self._loaded["runtime_dir"]))
        kill_vm_dir(rt, rt.read_state())
        self._loaded = {}


_running: weakref.WeakSet[SmolVMProvisioner] = weakref.WeakSet()
_egress_blocked_ended = 0  # blocked attempts of kernels that have ended


def egress_blocked_total() -> int:
    """Blocked connection attempts of every kernel of this process, ended or running."""
    total = _egress_blocked_ended
    for provisioner in list(_running):
        with contextlib.suppress(Exception):
            total += int((provisioner.egress_log() or {}).get("blocked", 0))
    return total


metrics.count_egress_blocked(egress_blocked_total)


def _audit_exit() -> None:
    """A server that exits without shutting its kernels down (stopped by a spawner) still
    logs their end, before the VMs go (``exit_hooks``: stage ``audit``)."""
    for provisioner in list(_running):
        with contextlib.suppress(Exception):
            provisioner._audit_end("server exited")


on_exit("audit", _audit_exit)


def bound_client_queues(manager: Any) -> None:
    """Sockets of this kernel's manager and of the clients it makes (``manager.client()``:
    nbclient, papermill, consoles; jupyter_server's own channels) queue at most
    ``CLIENT_RCVHWM`` messages each: a client that does not read (between cells) then
    pushes back on the relay, which holds at most ``iopub_backlog_mib`` and drops the rest
    with a notice, instead of pyzmq queueing a thousand messages of up to 64 MiB."""
    context = getattr(manager, "context", None)
    if isinstance(context, zmq.Context):
        context.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
    factory = getattr(manager, "client_factory", None)
    if not isinstance(factory, type) or getattr(factory, "_smol_bounded", False):
        return

    class BoundedClient(factory):  # type: ignore[misc, valid-type]
        _smol_bounded = True

        def _context_default(self) -> zmq.Context:
            context = super()._context_default()
            context.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
            return context

    BoundedClient.__name__ = BoundedClient.__qualname__ = factory.__name__
    manager.client_factory = BoundedClient


def _guest_connection(ci: dict) -> dict:
    """What the guest kernel needs of the connection info: keys, not host addresses."""
    out = {}
    for k in ("key", "signature_scheme", "kernel_name", "curve_publickey", "curve_secretkey"):
        v = ci.get(k)
        if v is None:
            continue
        out[k] = v.decode() if isinstance(v, bytes) else v
    return out


async def _listed(timeline: Timeline) -> list[Checkpoint]:
    return timeline.list()
