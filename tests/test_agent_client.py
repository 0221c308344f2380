"""The host side of the agent link reads guest-written bytes: whatever root in the guest sends
ends that link cleanly (pending requests fail at once), never an unhandled error or a hang."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from smol_kernel.agent_client import AgentError, GuestAgent


@pytest.fixture
async def link():
    """(agent, the guest's end of its control socket)."""
    host, guest = socket.socketpair()
    guest.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=host)
    agent = GuestAgent(SimpleNamespace(id="vm-test"), reader, writer)
    yield agent, guest
    await agent.close()
    guest.close()


async def send(guest: socket.socket, line: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(guest, line + b"\n")


@pytest.mark.parametrize("line", [
    b'{"id": [1], "ok": true}',  # unhashable id
    b'{"id": {"a": 1}, "ok": true}',
    b'{"event": "kernel_exited", "status": {"not": "an int"}}',
    b'[1, 2, 3]',
    b'not json at all',
    b'{"event": "kernel_exited", "status": 1e999999}',
    b'[' * 200_000 + b']' * 200_000,  # nested past the recursion limit
], ids=["list-id", "dict-id", "dict-status", "array", "not-json", "inf", "deep"])  # fmt: skip
async def test_a_malformed_guest_message_closes_the_link(link, line):
    agent, guest = link
    pending = asyncio.ensure_future(agent.request("ping", timeout=30))
    await asyncio.sleep(0.05)
    await send(guest, line)
    with pytest.raises(AgentError, match="connection closed"):
        await asyncio.wait_for(pending, 5)
    assert agent.closed.is_set()
    assert agent._task.done() and agent._task.exception() is None


async def test_a_well_formed_reply_still_answers(link):
    """Control for the above: the same link answers a proper reply."""
    agent, guest = link
    pending = asyncio.ensure_future(agent.request("ping", timeout=30))
    await asyncio.sleep(0.05)
    await send(guest, b'{"id": 1, "ok": true}')
    assert (await asyncio.wait_for(pending, 5))["ok"] is True
