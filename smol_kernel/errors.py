"""The errors a kernel start (or the host tools behind it) reports to the user.

jupyter_server turns an exception from a kernel start into "Unhandled error" unless it is a
tornado ``HTTPError``, whose message JupyterLab shows in its "Error Starting Kernel" dialog.
The provisioner therefore raises every start failure as a ``ReadableStartError``: an
``HTTPError`` (status 500, or 403 for a quota) that is also a ``KernelStartError``, so other
clients (nbclient, the sandbox, the CLI) catch it as before and read the same message.
Each message says what happened and what to do.
"""

from __future__ import annotations

import textwrap

from tornado.web import HTTPError


class KernelStartError(RuntimeError):
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


class HostToolError(Exception):
    """A host program smol-kernel needs is missing or failed; the message says what to do."""
