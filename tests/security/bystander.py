"""A bystander: another kernel that must keep working whatever an attack does."""

from __future__ import annotations

from ..kernel_helpers import run_cell, start_kernel


async def start_bystander(spec: str):
    """Start a kernel holding some state; returns (manager, client)."""
    km, kc = await start_kernel(spec)
    await run_cell(kc, "secret_state = 'bystander'")
    return km, kc


async def assert_bystander_fine(bystander) -> None:
    _, kc = bystander
    r = await run_cell(kc, "print(secret_state)", timeout=60)
    assert r.stdout.strip() == "bystander"
