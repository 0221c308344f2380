"""Jupyter server extension: fill the warm pool when the server starts.

Without it the pool fills after the first kernel of a configuration started cold. With it
(``smol-kernel install`` enables it), every smolvm kernelspec's configuration gets its
``pool_size`` VMs booting in the background as soon as the server is up, so the first
kernel a user opens is already a warm one. Kernelspecs that share the notebook's folder
(``share_cwd``) are warmed for the server's root folder.
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


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .ioloop import io_loop

    log = serverapp.log
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
