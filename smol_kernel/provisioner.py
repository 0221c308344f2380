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

import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import observe

from . import audit, quota
from . import checkpoint as store
from .agent_client import AgentError
from .checkpoint import Checkpoint
from .errors import KernelStartError, ReadableStartError
from .guest import protocol as P
from .image.store import GuestImage
from .ioloop import on_io_loop
from .kernel_control import KernelControl
from .kernel_state import KernelState
from .launch import KernelLauncher
from .packages.delivery import deliver
from .packages.installer import (
    HostInstaller,
    InstallError,
    InstallReport,
    PackagePolicy,
    default_index_url,
    guest_python_version,
)
from .packages.notebook_deps import notebook_requirements
from .packages.requirements import RequirementError
from .paths import RuntimeDirError
from .planning import KernelPlanner
from .pool import warm_pool
from .settings import KernelSettings
from .shown import escaped
from .timeline import Timeline
from .vm.base import VmError
from .vm.network import read_egress_log
from .vm.process import RuntimeDir, kill_vm_dir, proc_start_time, reap_orphans

CLIENT_RCVHWM = 1  # messages a client socket of a smolvm kernel queues (see bound_client_queues)


__all__ = ["KernelStartError", "SmolVMProvisioner"]


def _state_view(name: str) -> property:
    """An attribute of the provisioner that is its kernel state's ``name``."""
    return property(lambda self: getattr(self.state, name),
                    lambda self, value: setattr(self.state, name, value))  # fmt: skip


class SmolVMProvisioner(KernelSettings, LocalProvisioner):  # type: ignore[misc]
    """Runs the kernel in its own microVM (libkrun or QEMU), relaying its channels.
    Its settings (``c.SmolVMProvisioner.NAME``, or the kernelspec's provisioner config)
    are declared in ``settings.py``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connection_info = {}  # the base class shares one dict between all instances
        self.state = KernelState(log=self.log, kernel_id=self.kernel_id or "")
        self._loaded: dict = {}  # state from load_provisioner_info (a VM we did not start)
        self.planner = KernelPlanner(self, self.state, self.config)  # plans its VM
        self.timeline = Timeline(self, self.state, self.planner, self.vm_changed, self._install)
        self.launcher = KernelLauncher(self, self.state, self.planner, self.timeline,
                                       self.vm_changed)  # fmt: skip
        self._control: KernelControl | None = None  # its control socket (smol-kernel checkpoint)
        self._installer: HostInstaller | None = None  # its package installs (caps per kernel)
        self._installed_in: object = None  # the VM the installer's size counts for

    @observe("kernel_id")
    def _kernel_id_changed(self, change: dict) -> None:
        if (state := getattr(self, "state", None)) is not None:  # not yet during __init__
            state.kernel_id = change["new"] or ""

    # What runs the kernel, as the kernel manager, the server extension, sandboxes and the
    # audit read it: views of the kernel's state.
    vm = _state_view("vm")
    agent = _state_view("agent")
    relay = _state_view("relay")
    isolation = _state_view("isolation")
    ready_at = _state_view("ready_at")
    start_kind = _state_view("start_kind")
    plan = _state_view("plan")
    backend_name = _state_view("backend_name")
    vm_backend = _state_view("vm_backend")

    @property
    def _shown_id(self) -> str:
        """The kernel id for log lines: a REST client chooses it, so escaped."""
        return self.state.shown_id

    # ------------------------------------------------------------------ launch
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        try:
            await asyncio.to_thread(reap_orphans)
        except RuntimeDirError as e:
            raise ReadableStartError(500, f"cannot start a kernel: {e}") from None
        bound_client_queues(self.parent)
        extra = list(kwargs.get("extra_arguments") or [])
        kwargs = await super().pre_launch(**kwargs)  # ports, connection file, curve keys
        k = self.state
        k.display_name = self.kernel_spec.display_name
        if k.launches == 0:  # a restart of a fork is an ordinary restart
            k.restore_from = kwargs.pop("restore_from", None)
        kwargs.pop("restore_from", None)
        k.guest_env, k.kernel_env = self.planner.split_env(self.kernel_spec.env,
                                                           kwargs.get("env") or {})  # fmt: skip
        k.guest_argv = list(self.kernel_spec.argv) + extra
        k.shares, k.cwd = self.planner.resolve_shares(kwargs.get("cwd"))
        # The notebook (jupyter_server and smol-kernel run name it): its folder is the
        # kernel's working folder on the host, its name the session's.
        session = str((kwargs.get("env") or {}).get("JPY_SESSION_NAME") or "")
        k.notebook = (os.path.join(kwargs.get("cwd") or os.getcwd(), os.path.basename(session))
                      if session.endswith(".ipynb") else None)  # fmt: skip
        self.planner.check_network()
        return kwargs

    async def warm_up(self, cwd: str | None = None) -> str:
        """Fill the warm pool for this kernelspec's configuration now, before any kernel
        starts (the server extension calls this). Returns what it did, for the log."""
        if self.pool_size <= 0:
            return "pool_size is 0: no pool"
        k = self.state
        k.display_name = self.kernel_spec.display_name
        k.guest_env, k.kernel_env = self.planner.split_env(self.kernel_spec.env, dict(os.environ))
        k.guest_argv = list(self.kernel_spec.argv)
        k.shares, k.cwd = self.planner.resolve_shares(cwd)
        self.planner.check_network()
        return await on_io_loop(self.launcher.warm_up())

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        try:
            return await on_io_loop(self._launch())
        except ReadableStartError:
            raise
        except KernelStartError as e:
            raise ReadableStartError(500, str(e)) from e

    async def _launch(self) -> KernelConnectionInfo:
        try:
            seconds = await self.launcher.launch(self.connection_info)
            await self._install_notebook_dependencies()
        except BaseException:
            await self._teardown()
            raise
        audit.kernel_started(self, self.state.start_kind or "cold", seconds)
        if self.max_lifetime > 0:
            asyncio.get_running_loop().call_later(self.max_lifetime, self._expire,
                                                  self.state.launches)  # fmt: skip
        return self.connection_info

    async def vm_changed(self) -> None:
        """The kernel's VM is new (a launch or a rewind): its control socket moves."""
        if self._control is not None:
            await self._control.close()
            self._control = None
        if self.vm is not None and self.relay is not None:
            control = KernelControl(self.timeline, self.vm.runtime_dir)
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

    # ------------------------------------------------------------------ packages
    async def install_packages(self, requirements: list[str]) -> InstallReport:
        """Install ``requirements`` into this kernel's VM: resolved and fetched by the host,
        binary wheels only, unpacked in the guest; the kernel keeps no network
        (docs/packages.md). RequirementError or InstallError say why not."""
        return await on_io_loop(self._install(list(requirements)))

    async def _install_notebook_dependencies(self) -> None:
        """The notebook's PEP 723 dependencies, installed before it runs a cell."""
        notebook = self.state.notebook
        if notebook is None:
            return
        try:
            wanted = await asyncio.to_thread(notebook_requirements, notebook)
            if not wanted:
                return
            report = await self._install(wanted)
        except (RequirementError, InstallError, VmError, AgentError, TimeoutError) as e:
            raise KernelStartError(
                f"the dependencies of {os.path.basename(notebook)!r} (its '# /// script' "
                f"block) were not installed: {e}"
            ) from None
        self.log.info("kernel %s: %s (the notebook's dependencies)", self._shown_id,
                      report.text)  # fmt: skip

    async def _install(self, requirements: list[str]) -> InstallReport:
        agent, vm, plan = self.agent, self.vm, self.plan
        if agent is None or vm is None or plan is None or vm.poll() is not None:
            raise VmError("the kernel's VM is not running")
        if not self.package_installs:
            raise InstallError("this server installs no packages for this kernel "
                               "(SmolVMProvisioner.package_installs is off)")  # fmt: skip
        if self._installer is None:
            policy = PackagePolicy(
                self.package_index_url or await asyncio.to_thread(default_index_url),
                self.max_install_mib, self.max_installs_per_minute,
                self.max_packages_per_install, tuple(self.package_allow),
                tuple(self.package_block),
            )  # fmt: skip
            versions = (await asyncio.to_thread(GuestImage.load, plan.image)).manifest
            python = guest_python_version(versions.get("versions") or {})
            self._installer = HostInstaller(policy, python)
        installer = self._installer
        if self._installed_in is not vm:  # a new VM has none of what the last one got
            installer.new_vm()
            self._installed_in = vm
        t0 = time.monotonic()
        installed = await installer.install(requirements)
        try:
            folder = await deliver(
                lambda op, timeout, **fields: agent.request(op, timeout=timeout, **fields),
                installed,
            )
        except BaseException:
            installer.refund(installed)
            raise
        finally:
            await asyncio.to_thread(installed.discard)
        report = InstallReport(installed.packages, installed.size_bytes, folder,
                               time.monotonic() - t0)  # fmt: skip
        audit.record(self, "packages_installed", size_bytes=report.size_bytes,
                     packages=[f"{n}=={v}" for n, v in report.packages])  # fmt: skip
        return report

    def _expire(self, launch: int) -> None:
        """The kernel of launch number ``launch`` has lived ``max_lifetime`` (a rewind
        changes its VM, not its age; a restart is a new launch)."""
        vm = self.vm
        if self.state.launches == launch and vm is not None and vm.poll() is None:
            self.log.warning(
                "kernel %s: max_lifetime of %.0fs reached, stopping VM %s",
                self._shown_id, self.max_lifetime, vm.id,
            )  # fmt: skip
            self.state.end_reason = "max_lifetime"
            vm.kill()

    def egress_log(self) -> dict | None:
        """What the network guard of the kernel's current VM logged (``egress/log.py``):
        every destination tried, allowed or blocked; None without network."""
        vm, plan = self.vm, self.plan
        if vm is None or plan is None or not plan.network:
            return None
        return read_egress_log(vm.runtime_dir)

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
            return self.state.exit_status if self.state.exit_status is not None else 0
        status = None
        if self.agent is not None and self.agent.kernel_exited.is_set():
            status = self.agent.kernel_exit_status
        elif (vm_status := self.vm.poll()) is not None:
            status = vm_status if vm_status != 0 else 1  # the VM ended, its kernel did not
        if status is not None and self.state.end_reason == "ended" and not self.state.crashed:
            self.state.crashed = f"exit status {status}"  # nobody asked it to go
        return status

    async def wait(self) -> int | None:
        return await on_io_loop(self._wait())

    async def _wait(self) -> int | None:
        while (status := await self._poll()) is None:
            await asyncio.sleep(0.1)
        self.state.exit_status = status
        if self.state.end_reason == "ended":
            self.state.end_reason = f"kernel exited ({status})"
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
        if self.state.end_reason == "ended":
            self.state.end_reason = "restart" if restart else "killed"
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
        if not restart and self.kernel_id and self.state.launches:
            try:
                removed = await asyncio.to_thread(store.remove_kernel, self.kernel_id)
            except RuntimeError:  # no threads any more: a cleanup at interpreter exit
                removed = store.remove_kernel(self.kernel_id)  # (nbclient's, after a failure)
            for cp in removed:
                self.log.info("kernel %s: removed checkpoint %s with its kernel",
                              self._shown_id, escaped(cp.name))  # fmt: skip
        await super().cleanup(restart=restart)

    async def _teardown(self, keep_relay: bool = False) -> None:
        """Stop relaying, close the agent, destroy the VM. Idempotent."""
        relay, agent, vm = None if keep_relay else self.relay, self.agent, self.vm
        if not keep_relay:
            self.relay = None
            if quota.ledger().kernels.pop(id(self.state), None) is not None:
                warm_pool().nudge()  # a refill a quota held back may fit now
        if vm is not None and self.ready_at is not None and not keep_relay:
            audit.kernel_ended(self, self.state.end_reason)
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
        self.state.end_reason = "restart" if restart else "shutdown"

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, 10.0)  # an emulated guest needs longer to exit cleanly

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, 30.0)

    def resolve_path(self, path_str: str) -> str | None:
        """Map a guest path inside a share to the host path; anything else is guest-only."""
        import posixpath

        guest = posixpath.normpath(posixpath.join(self.state.cwd, path_str))
        for share in self.state.shares:
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


async def _listed(timeline: Timeline) -> list[Checkpoint]:
    return timeline.list()
