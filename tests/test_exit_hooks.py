"""One exit hook, a fixed order: audit, then no more refills, then close the VMs --
whichever module a program imported first (atexit alone runs hooks in reverse import
order)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROGRAM = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
from smol_kernel import exit_hooks
order = []
for stage, hooks in exit_hooks._hooks.items():
    exit_hooks._hooks[stage] = [
        (lambda s=stage, h=hook: order.append((s, h.__module__ + "." + h.__name__)))
        for hook in hooks
    ]
exit_hooks.run_exit_hooks()
print(json.dumps(order))
"""
EXPECTED = [
    ["audit", "smol_kernel.audit._audit_exit"],
    ["stop_refills", "smol_kernel.pool._stop_refills"],
    ["close_vms", "smol_kernel.vm.process._close_open_vms"],
]


@pytest.mark.parametrize("imports", [
    ["smol_kernel.vm.process", "smol_kernel.pool", "smol_kernel.provisioner"],
    ["smol_kernel.provisioner"],
    ["smol_kernel.pool", "smol_kernel.vm.process", "smol_kernel.provisioner"],
])  # fmt: skip
def test_exit_steps_run_in_stage_order_whatever_was_imported_first(imports):
    out = subprocess.run([sys.executable, "-c", PROGRAM, *imports], capture_output=True,
                         text=True, check=True, timeout=120).stdout  # fmt: skip
    assert json.loads(out) == EXPECTED


def test_the_only_atexit_hook_is_ours():
    """No module registers its own atexit hook again (its order would be import order)."""
    from pathlib import Path

    import smol_kernel

    root = Path(smol_kernel.__file__).parent
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if "atexit" in p.read_text())  # fmt: skip
    assert users == ["exit_hooks.py"], users
