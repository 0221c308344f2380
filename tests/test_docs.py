"""The docs name what the code has: every provisioner setting is in the README's table."""

from __future__ import annotations

import re
from pathlib import Path

from smol_kernel.provisioner import SmolVMProvisioner
from smol_kernel.settings import KernelSettings

ROOT = Path(__file__).resolve().parent.parent


def test_every_provisioner_setting_is_in_the_readme_table():
    table = set(re.findall(r"^\| `([a-z_]+)` \|", (ROOT / "README.md").read_text(), re.M))
    ours = set(KernelSettings.class_traits(config=True))
    assert ours, "the provisioner has settings"
    assert not ours - table, f"settings missing from README.md's table: {sorted(ours - table)}"
    stale = {name for name in table - ours if not hasattr(SmolVMProvisioner, name)}
    assert not stale, f"README.md's table names settings that do not exist: {sorted(stale)}"
