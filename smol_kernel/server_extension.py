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


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_client.provisioning import KernelProvisionerFactory

    from .ioloop import io_loop

    log = serverapp.log
    ksm = serverapp.kernel_spec_manager
    factory = KernelProvisionerFactory.instance(parent=serverapp)
    for name in smolvm_kernelspecs(ksm):
        try:
            provisioner = factory.create_provisioner_instance(
                "", ksm.get_kernel_spec(name), parent=serverapp.kernel_manager
            )
        except Exception as e:  # a broken kernelspec must not stop the server
            log.warning("smol-kernel: not warming kernelspec %r: %s", name, e)
            continue
        fut = asyncio.run_coroutine_threadsafe(
            provisioner.warm_up(cwd=serverapp.root_dir), io_loop()
        )

        def done(fut, name=name) -> None:
            try:
                log.info("smol-kernel: warm pool for kernelspec %r: %s", name, fut.result())
            except Exception as e:
                log.warning("smol-kernel: not warming kernelspec %r: %s", name, e)

        fut.add_done_callback(done)
