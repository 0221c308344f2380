"""Jupyter server extension: fill the warm pool when the server starts.

Without it the pool fills after the first kernel of a configuration started cold. With it
(``smol-kernel install`` enables it), every smolvm kernelspec's configuration gets its
``pool_size`` VMs booting in the background as soon as the server is up, so the first
kernel a user opens is already a warm one. Kernelspecs that share the notebook's folder
(``share_cwd``) are warmed for the server's root folder.

It also lets the server stop after a kernel failed to start (see ``forget_failed_starts``),
and bounds what the server itself holds of a smolvm kernel's output (``bound_server_output``).
Its REST routes (checkpoints, rewind, fork) are in ``rest.py``.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

from .kernelspec import PROVISIONER_NAME

if TYPE_CHECKING:
    from jupyter_server.serverapp import ServerApp

WEBSOCKET_BACKLOG = 32 << 20  # bytes written to one browser and not yet sent, at most
OFFLINE_BUFFER = 32 << 20  # bytes kept for a disconnected session, at most


def smolvm_kernelspecs(kernel_spec_manager) -> list[str]:
    """Names of the installed kernelspecs that use our provisioner."""
    names = []
    for name, entry in kernel_spec_manager.get_all_specs().items():
        meta = (entry.get("spec") or {}).get("metadata") or {}
        if (meta.get("kernel_provisioner") or {}).get("provisioner_name") == PROVISIONER_NAME:
            names.append(name)
    return sorted(names)


async def warm_kernelspec(spec: Any, cwd: str | None = None, parent: Any = None) -> str:
    """Fill the warm pool for one kernelspec (a ``KernelSpec``) now; returns what it did.
    Awaitable from any loop (the provisioner hops onto the io loop)."""
    from jupyter_client.provisioning import KernelProvisionerFactory

    factory = KernelProvisionerFactory.instance(parent=parent)
    provisioner = factory.create_provisioner_instance("", spec, parent)
    return await provisioner.warm_up(cwd=cwd)


def forget_failed_starts(kernel_manager: Any) -> bool:
    """Work around jupyter_client 8: a kernel whose start failed (a quota, a hardware-only
    kernelspec on a TCG host) stays in the manager's ``_pending_kernels``; ``shutdown_all``
    then fails on it and the server no longer exits on SIGTERM. Drop such a kernel from
    there once its start has failed. False if the manager is not built that way."""
    add = getattr(kernel_manager, "_add_kernel_when_ready", None)
    pending = getattr(kernel_manager, "_pending_kernels", None)
    kernels = getattr(kernel_manager, "_kernels", None)
    if add is None or not isinstance(pending, dict) or not isinstance(kernels, dict):
        return False

    async def add_kernel_when_ready(kernel_id: str, km: Any, starting: Any) -> None:
        await add(kernel_id, km, starting)  # it logs a failure and returns
        if kernel_id not in kernels:  # (with use_pending_kernels it is, and shuts down)
            pending.pop(kernel_id, None)

    kernel_manager._add_kernel_when_ready = add_kernel_when_ready
    return True


def _is_smolvm(kernel_manager: Any, kernel_id: str) -> bool:
    try:
        provisioner = kernel_manager.get_kernel(kernel_id).provisioner
    except Exception:
        return False
    return type(provisioner).__module__.startswith("smol_kernel.")


def bound_server_output() -> bool:
    """jupyter_server holds a kernel's output twice without a bound: tornado queues what a
    browser has not read yet, and a session whose browser went away gets every message
    buffered in a list until it comes back. For smolvm kernels, stop reading the kernel's
    iopub while ``WEBSOCKET_BACKLOG`` bytes wait for a browser, or once ``OFFLINE_BUFFER``
    bytes are buffered: the relay then holds the rest up to ``iopub_backlog_mib`` and drops
    what is over it, with a notice. False if this jupyter_server is not built that way."""
    try:
        from jupyter_server.services.kernels.kernelmanager import MappingKernelManager
        from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
    except ImportError:
        return False
    write, buffering = KernelWebsocketHandler.write_message, MappingKernelManager.start_buffering
    if getattr(write, "_smol_bounded", False):
        return True

    def iopub_of(handler: Any) -> Any:
        channels = getattr(getattr(handler, "connection", None), "channels", None) or {}
        return channels.get("iopub")

    def write_message(self, message, binary=False):
        future = write(self, message, binary)
        if not getattr(self, "_smol_checked", False):
            self._smol_checked = True
            self._smol_bound = _is_smolvm(self.kernel_manager, self.kernel_id)
            self._smol_pending = 0
        if not self._smol_bound:
            return future
        size = len(message)
        self._smol_pending += size
        stream = iopub_of(self)
        if self._smol_pending > WEBSOCKET_BACKLOG and stream is not None and not stream.closed():
            stream.stop_on_recv()  # the relay holds (and drops) the rest

        def written(_future: Any) -> None:
            self._smol_pending -= size
            stream = iopub_of(self)
            paused = stream is not None and not stream.closed() and not stream.receiving()
            if paused and self._smol_pending < WEBSOCKET_BACKLOG // 2:
                stream.on_recv_stream(self.connection.handle_outgoing_message)

        future.add_done_callback(written)
        return future

    def start_buffering(self, kernel_id, session_key, channels):
        buffering(self, kernel_id, session_key, channels)
        info = getattr(self, "_kernel_buffers", {}).get(kernel_id) or {}
        if info.get("channels") is not channels or not _is_smolvm(self, kernel_id):
            return
        held = [0]

        def buffer_msg(channel: str, parts: list) -> None:
            info["buffer"].append((channel, parts))
            held[0] += sum(len(p) for p in parts)
            if held[0] > OFFLINE_BUFFER:  # reconnecting replays and reads again
                for stream in channels.values():
                    stream.stop_on_recv()

        for channel, stream in channels.items():
            stream.on_recv(functools.partial(buffer_msg, channel))

    write_message._smol_bounded = True  # type: ignore[attr-defined]
    KernelWebsocketHandler.write_message = write_message
    MappingKernelManager.start_buffering = start_buffering
    return True


def _load_jupyter_server_extension(serverapp: ServerApp) -> None:
    import os

    from .ioloop import io_loop

    log = serverapp.log
    # Host kernels, terminals and language servers this server starts inherit this: no
    # `python -m` started in a folder a guest can write (share_cwd=rw) imports from it.
    os.environ["PYTHONSAFEPATH"] = "1"
    if not forget_failed_starts(serverapp.kernel_manager):
        log.warning("smol-kernel: this kernel manager may not stop after a failed start")
    if not bound_server_output():
        log.warning("smol-kernel: cannot bound the output this server holds for browsers")
    from .lockdown import LockedKernelSpecManager, host_executing_extensions
    from .rest import handlers

    if isinstance(serverapp.kernel_spec_manager, LockedKernelSpecManager):
        # nbconvert's default template folder is the working folder, which the contents
        # API writes: a template there is Jinja run on the host (not sandboxed).
        serverapp.config.TemplateExporter.extra_template_basedirs = []
        for what in host_executing_extensions(serverapp):
            log.error("smol-kernel lock-down: this server loads an extension that runs code "
                      "ON THE HOST, outside any VM: %s. Disable it: jupyter server extension "
                      "disable %s", what, what.split(":")[0])  # fmt: skip
    serverapp.web_app.add_handlers(".*$", handlers(serverapp.base_url))
    ksm = serverapp.kernel_spec_manager
    for name in smolvm_kernelspecs(ksm):
        try:
            spec = ksm.get_kernel_spec(name)
        except Exception as e:  # a broken kernelspec must not stop the server
            log.warning("smol-kernel: not warming kernelspec %r: %s", name, e)
            continue
        fut = asyncio.run_coroutine_threadsafe(
            warm_kernelspec(spec, serverapp.root_dir, serverapp.kernel_manager), io_loop()
        )

        def done(fut, name=name) -> None:
            try:
                log.info("smol-kernel: warm pool for kernelspec %r: %s", name, fut.result())
            except Exception as e:
                log.warning("smol-kernel: not warming kernelspec %r: %s", name, e)

        fut.add_done_callback(done)
