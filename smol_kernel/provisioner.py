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
import os
import signal
import time
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Bool, Enum, Float, Integer, List, Unicode

from .agent_client import GuestAgent
from .guest import protocol as P
from .ioloop import on_io_loop
from .relay import VsockRelay
from .vm.base import Vm, VmError
from .vm.process import RuntimeDir, kill_vm_dir, proc_start_time, reap_orphans
from .vm.select import BACKENDS, select_backend
from .vm.share import Share, ShareError, parse_share
from .vm.spec import VmSpec

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host variables a kernel legitimately needs to know; everything else stays on the host.
PASSED_THROUGH = ("JPY_SESSION_NAME",)


class KernelStartError(RuntimeError):
    """The kernel VM did not come up; the message has the reason and the console tail."""


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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connection_info = {}  # the base class shares one dict between all instances
        self.vm: Vm | None = None
        self.agent: GuestAgent | None = None
        self.relay: VsockRelay | None = None
        self.isolation: str | None = None
        self.ready_at: float | None = None  # time.monotonic() when the kernel was ready
        self.backend_name: str | None = None
        self._guest_env: dict[str, str] = {}
        self._guest_argv: list[str] = []
        self._shares: tuple[Share, ...] = ()
        self._cwd = "/root"
        self._exit_status: int | None = None
        self._loaded: dict = {}  # state from load_provisioner_info (a VM we did not start)

    # ------------------------------------------------------------------ launch
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        await asyncio.to_thread(reap_orphans)
        extra = list(kwargs.get("extra_arguments") or [])
        kwargs = await super().pre_launch(**kwargs)  # ports, connection file, curve keys
        host_env = kwargs.get("env") or {}
        env = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "SHELL": "/bin/sh"}
        for name in self.kernel_spec.env or {}:
            if name in host_env:  # after the base class's ${VAR} substitution
                env[name] = str(host_env[name])
        for name in PASSED_THROUGH:
            if name in host_env:
                env[name] = str(host_env[name])
        if self.kernel_id:
            env["KERNEL_ID"] = self.kernel_id
        self._guest_env = env
        self._guest_argv = list(self.kernel_spec.argv) + extra
        self._shares, self._cwd = self._resolve_shares(kwargs.get("cwd"))
        return kwargs

    def _resolve_shares(self, host_cwd: str | None) -> tuple[tuple[Share, ...], str]:
        """Parse ``shares`` and ``share_cwd`` now, so bad ones fail before any VM boots."""
        shares = []
        try:
            for text in self.shares:
                shares.append(parse_share(text, host_cwd))
            if self.share_cwd != "off":
                shares.append(
                    parse_share(f"{host_cwd or '.'}:{self.cwd_guest_path}:{self.share_cwd}")
                )
        except ShareError as e:
            raise KernelStartError(
                f"cannot start a {self.kernel_spec.display_name} kernel: {e}"
            ) from None
        cwd = self.guest_cwd or (shares[-1].guest if self.share_cwd != "off" else "/root")
        return tuple(shares), cwd

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        return await on_io_loop(self._launch())

    async def _launch(self) -> KernelConnectionInfo:
        deadline = time.monotonic() + self.startup_timeout
        self._exit_status = None
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
        ci = self.connection_info
        relay = VsockRelay(
            str(ci.get("transport", "tcp")),
            str(ci.get("ip", "127.0.0.1")),
            {ch: int(ci[f"{ch}_port"]) for ch in P.CHANNEL_PORTS},  # type: ignore[call-overload]
        )
        relay.bind()
        self.relay = relay
        try:
            spec = VmSpec(
                image=self.image,
                vcpus=self.vcpus,
                memory_mib=self.memory_mib,
                disk_mib=self.disk_mib,
                label=self.kernel_id or "",
                network=self.network,
                dns=tuple(self.dns_servers),
                shares=self._shares,
            )
            self.vm = vm = await selection.backend.start(spec)
            self.isolation = str(vm.isolation)
            self.backend_name = selection.backend.name
            self.log.info(
                "kernel %s: VM %s (%s, isolation %s) booting",
                self.kernel_id, vm.id, self.backend_name, self.isolation,
            )  # fmt: skip
            self.agent = agent = await GuestAgent.connect(vm, deadline - time.monotonic())
            env = dict(self._guest_env)
            env["SMOL_KERNEL_ISOLATION"] = self.isolation
            env["SMOL_KERNEL_BACKEND"] = self.backend_name
            await agent.request(
                P.OP_START_KERNEL,
                argv=self._guest_argv,
                env=env,
                cwd=self._cwd,
                connection=_guest_connection(ci),
                max_processes=self.max_processes,
            )
            await self._wait_kernel_ready(deadline)
            await relay.start_serving(vm.open_stream)
        except BaseException:
            await self._teardown()
            raise
        self.ready_at = time.monotonic()
        if self.max_lifetime > 0:
            asyncio.get_running_loop().call_later(self.max_lifetime, self._expire, vm)
        self.log.info("kernel %s: ready in VM %s", self.kernel_id, vm.id)
        return self.connection_info

    def _expire(self, vm: Vm) -> None:
        if self.vm is vm and vm.poll() is None:
            self.log.warning(
                "kernel %s: max_lifetime of %.0fs reached, stopping VM %s",
                self.kernel_id, self.max_lifetime, vm.id,
            )  # fmt: skip
            vm.kill()

    async def _wait_kernel_ready(self, deadline: float) -> None:
        assert self.agent is not None and self.vm is not None
        agent, vm = self.agent, self.vm
        ready = asyncio.ensure_future(agent.kernel_ready.wait())
        exited = asyncio.ensure_future(agent.kernel_exited.wait())
        gone = asyncio.ensure_future(agent.closed.wait())
        try:
            await asyncio.wait(
                {ready, exited, gone},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for f in (ready, exited, gone):
                f.cancel()
        if agent.kernel_ready.is_set():
            return
        if agent.kernel_exited.is_set():
            raise KernelStartError(
                f"the kernel exited in the VM with status {agent.kernel_exit_status} before "
                f"it was ready. Its output:\n{agent.kernel_output_tail}"
            )
        if agent.closed.is_set():
            what = "the VM stopped"
        else:
            what = f"the kernel did not answer within {self.startup_timeout:.0f}s (startup_timeout)"
        raise KernelStartError(f"{what}. Guest console:\n{vm.console_tail()}")

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
        if self.agent is not None and self.agent.kernel_exited.is_set():
            return self.agent.kernel_exit_status
        status = self.vm.poll()
        if status is not None:
            return status if status != 0 else 1  # the VM ended without its kernel exiting
        return None

    async def wait(self) -> int | None:
        return await on_io_loop(self._wait())

    async def _wait(self) -> int | None:
        while (status := await self._poll()) is None:
            await asyncio.sleep(0.1)
        self._exit_status = status
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

    async def kill(self, restart: bool = False) -> None:
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
        await super().cleanup(restart=restart)

    async def _teardown(self) -> None:
        """Stop relaying, close the agent, destroy the VM. Idempotent."""
        relay, agent, vm = self.relay, self.agent, self.vm
        self.relay = self.agent = self.vm = None
        if relay is not None:
            await relay.close()
        if agent is not None:
            await agent.close()
        if vm is not None:
            await vm.close()

    async def shutdown_requested(self, restart: bool = False) -> None:
        """The kernel got shutdown_request; when it exits the agent powers the VM off."""

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


def _guest_connection(ci: dict) -> dict:
    """What the guest kernel needs of the connection info: keys, not host addresses."""
    out = {}
    for k in ("key", "signature_scheme", "kernel_name", "curve_publickey", "curve_secretkey"):
        v = ci.get(k)
        if v is None:
            continue
        out[k] = v.decode() if isinstance(v, bytes) else v
    return out
