"""Jupyter server extension: fill the warm pool when the server starts.

Without it the pool fills after the first kernel of a configuration started cold. With it
(``smol-kernel install`` enables it), every smolvm kernelspec's configuration gets its
``pool_size`` VMs booting in the background as soon as the server is up, so the first
kernel a user opens is already a warm one. Kernelspecs that share the notebook's folder
(``share_cwd``) are warmed for the server's root folder.

It also lets the server stop after a kernel failed to start (see ``forget_failed_starts``).
"""

from __future__ import annotations

import asyncio
from typing import Any

PROVISIONER_NAME = "smolvm-provisioner"


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


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .ioloop import io_loop

    log = serverapp.log
    if not forget_failed_starts(serverapp.kernel_manager):
        log.warning("smol-kernel: this kernel manager may not stop after a failed start")
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
