"""The errors a kernel start (or the host tools behind it) reports to the user.

jupyter_server turns an exception from a kernel start into "Unhandled error" unless it is a
tornado ``HTTPError``, whose message JupyterLab shows in its "Error Starting Kernel" dialog.
The provisioner therefore raises every start failure as a ``ReadableStartError``: an
``HTTPError`` (status 500, or 403 for a quota) that is also a ``KernelStartError``, so other
clients (nbclient, the sandbox, the CLI) catch it as before and read the same message.
Each message says what happened and what to do.

Every error smol-kernel raises to a user derives from ``SmolKernelError``; the public ones
can be imported from here (those of lower layers load when first named, so that importing
this module pulls in no layer above the one asking).
"""

from __future__ import annotations

import textwrap

from tornado.web import HTTPError

from .error_root import SmolKernelError


class KernelStartError(SmolKernelError, RuntimeError):
    """The kernel VM did not come up; the message has the reason and the console tail."""


class ReadableStartError(HTTPError, KernelStartError):
    """A kernel start failure whose message is wrapped at 88 columns (the dialog shows it
    in a ``<pre>``); ``str()`` is that message, as the sessions API passes ``str(error)``."""

    def __init__(self, status_code: int, message: str):
        shown = "\n".join(
            textwrap.fill(line, 88, break_long_words=False, break_on_hyphens=False)
            for line in message.splitlines()
        )
        # tornado %-formats log_message when it logs the error
        super().__init__(status_code, shown.replace("%", "%%"))
        self.message = shown

    def __str__(self) -> str:
        return self.message


class QuotaExceeded(ReadableStartError):
    """A start refused by max_vms / max_total_memory_mib (HTTP 403)."""

    def __init__(self, message: str):
        super().__init__(403, message)


class HostToolError(SmolKernelError):
    """A host program smol-kernel needs is missing or failed; the message says what to do."""


# name -> the module that defines it (imported on first use: no import cycles)
_PUBLIC = {
    "AllowListError": "egress.allowlist",
    "BackendUnavailable": "vm.base",
    "CheckpointError": "checkpoint",
    "FolderError": "vm.host_folder",
    "ImageBuildError": "image.build_steps",
    "ImageFileError": "image.portable",
    "ImageNotFound": "image.store",
    "OciError": "image.oci",
    "PrivateDirError": "paths",
    "QmpError": "vm.qmp",
    "RelayError": "relay.kernel_relay",
    "RuntimeDirError": "paths",
    "SandboxError": "sandbox.session",
    "ShareError": "vm.share",
    "VmError": "vm.base",
    "VmSpecError": "vm.spec",
}
__all__ = ["HostToolError", "KernelStartError", "QuotaExceeded", "ReadableStartError",
           "SmolKernelError", *_PUBLIC]  # fmt: skip


def __getattr__(name: str) -> type[SmolKernelError]:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{_PUBLIC[name]}"), name)
