"""Lock-down: a Jupyter server that starts only smolvm kernels.

jupyter_client's ``allowed_kernelspecs`` only filters the *listing*: ``get_kernel_spec`` still
returns any installed kernelspec by name (a user's own ``~/.local/share/jupyter/kernels``
included), and ``python3`` falls back to ipykernel's native spec even with
``ensure_native_kernel = False``. A page or a client that POSTs ``/api/kernels {"name":
"python3"}`` would then start a kernel on the host. ``LockedKernelSpecManager`` (set as
``ServerApp.kernel_spec_manager_class`` by ``smol-kernel install --lockdown``) refuses every
name that is not allowed, before any process starts, with HTTP 403 and the reason.

Lock-down also turns off terminals (a terminal is a shell on the host) and JupyterLab's
extension manager's installs (pip on the host) unless the administrator opts back in.
"""

from __future__ import annotations

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from tornado.web import HTTPError

KERNEL_SPEC_MANAGER = "smol_kernel.lockdown.LockedKernelSpecManager"


class KernelspecNotAllowed(HTTPError, NoSuchKernel):
    """A kernelspec name this server must not start (HTTP 403; also a NoSuchKernel, which
    the sessions API and other callers already handle)."""

    def __init__(self, name: str, allowed: set[str]) -> None:
        message = (f"kernelspec {name!r} is not allowed on this server, which is locked down "
                   f"to {', '.join(sorted(allowed)) or 'no kernelspecs'} "
                   "(KernelSpecManager.allowed_kernelspecs)")  # fmt: skip
        HTTPError.__init__(self, 403, message.replace("%", "%%"))
        self.args = (message,)
        self.name, self.message = name, message

    def __str__(self) -> str:
        return self.message


class LockedKernelSpecManager(KernelSpecManager):
    """A KernelSpecManager that knows only ``allowed_kernelspecs`` (by exact, lower-case
    name; no native-kernel fallback). With an empty allow-list it allows nothing."""

    def _allowed(self) -> set[str]:
        return {name.lower() for name in self.allowed_kernelspecs}

    def _find_spec_directory(self, kernel_name: str) -> str | None:
        if kernel_name.lower() not in self._allowed():
            return None
        path = super()._find_spec_directory(kernel_name)
        return None if path is not None and path == _native_resources() else path

    def find_kernel_specs(self) -> dict[str, str]:
        allowed, native = self._allowed(), _native_resources()
        specs = super().find_kernel_specs()
        return {n: d for n, d in specs.items() if n.lower() in allowed and d != native}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if not isinstance(kernel_name, str) or kernel_name.lower() not in self._allowed():
            raise KernelspecNotAllowed(str(kernel_name), set(self.allowed_kernelspecs))
        return super().get_kernel_spec(kernel_name)


def _native_resources() -> str | None:
    """The folder of ipykernel's built-in kernelspec (the native fallback), if installed."""
    try:
        from ipykernel.kernelspec import RESOURCES
    except ImportError:
        return None
    return RESOURCES
