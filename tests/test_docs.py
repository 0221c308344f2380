"""The docs name what the code has: every provisioner setting is in the README's table."""

from __future__ import annotations

import re
from pathlib import Path

from smol_kernel.settings import KernelSettings

ROOT = Path(__file__).resolve().parent.parent


def test_every_provisioner_setting_is_in_the_readme_table():
    table = set(re.findall(r"^\| `([a-z_]+)` \|", (ROOT / "README.md").read_text(), re.M))
    ours = set(KernelSettings.class_traits(config=True))
    assert ours, "the provisioner has settings"
    assert not ours - table, f"settings missing from README.md's table: {sorted(ours - table)}"
    stale = table - ours
    assert not stale, f"README.md's table names settings that do not exist: {sorted(stale)}"


async def test_the_mcp_tools_the_docs_list_are_the_servers():
    """AGENTS.md and docs/ai-assistants.md name every tool `smol-kernel mcp` has, and
    nothing else in their tool lists (checkpoint, rewind and fork were missing)."""
    from smol_kernel.mcp_server import Sessions, build_server

    tools = {t.name for t in await build_server(Sessions({})).list_tools()}
    assert {"run_python", "checkpoint", "fork"} <= tools
    agents = (ROOT / "AGENTS.md").read_text()
    listed = agents[agents.index("smol-kernel mcp") :].split(").", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", listed)) == tools, listed
    guide = (ROOT / "docs" / "ai-assistants.md").read_text()
    listed = guide[guide.index("\nTools: ") :].split("A session is", 1)[0]
    assert set(re.findall(r"`([a-z_]+)[(`]", listed)) == tools, listed


def test_the_metric_labels_the_docs_give_are_the_start_kinds():
    """docs/deploy.md lists every value of the start metrics' ``kind`` label: what a
    launch records as its start kind (clone, fork and restored were missing)."""
    code = (ROOT / "smol_kernel" / "launch.py").read_text()
    code += (ROOT / "smol_kernel" / "template.py").read_text()
    kinds = set(re.findall(r'start_kind = "(\w+)"', code)) | set(
        re.findall(r'"(\w+)" if fork else "(\w+)"', code)[0]
    ) | set(re.findall(r'return vm, agent, "(\w+)"', code))  # fmt: skip
    assert kinds == {"cold", "pooled", "clone", "fork", "restored"}, kinds
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    line = deploy[deploy.index("smol_kernel_vm_starts_total{kind}") :].split("histogram", 1)[0]
    assert set(re.findall(r"`(\w+)`", line)) - {"kind"} == kinds, line
