"""The one interpreter-exit hook, and the fixed order of what it does.

Process-wide state lives in three places (the provisioner's running kernels, the warm
pool, the open VMs), each owned by its module. What each must do at exit depends on the
others: audit lines need the VMs still there, a refill must not start once VMs are being
closed. ``atexit`` would run separate hooks in reverse import order, which no module
controls; so each module registers its step here under a named stage, and the single
``atexit`` hook runs the stages in ``STAGES`` order, whatever was imported first.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Callable

STAGES = (
    "audit",  # log the end of kernels still running (their VMs are still there)
    "stop_refills",  # no warm-pool refill may start a VM from here on
    "close_vms",  # close every open VM: processes stopped, runtime folders removed
)
_hooks: dict[str, list[Callable[[], None]]] = {stage: [] for stage in STAGES}


def on_exit(stage: str, hook: Callable[[], None]) -> Callable[[], None]:
    """Run ``hook`` at interpreter exit in ``stage`` (one of ``STAGES``)."""
    _hooks[stage].append(hook)  # KeyError for an unknown stage: a programming error
    return hook


def run_exit_hooks() -> None:
    """Every registered hook, stage by stage; one hook failing does not stop the rest."""
    for stage in STAGES:
        for hook in list(_hooks[stage]):
            with contextlib.suppress(Exception):
                hook()


atexit.register(run_exit_hooks)
