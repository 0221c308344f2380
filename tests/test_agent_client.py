"""The host side of the agent link reads guest-written bytes: whatever root in the guest sends
ends that link cleanly (pending requests fail at once), never an unhandled error or a hang."""

from __future__ import annotations

import asyncio
import json
import socket
from types import SimpleNamespace

import pytest

from smol_kernel.agent_client import AgentError, GuestAgent
from smol_kernel.guest import protocol as P
from smol_kernel.vm.base import VmError


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


class _OneStreamVm:
    """A VM whose control port is one end of a socket pair (the other is the 'guest')."""

    id = "vm-test"
    streams_wait_for_guest = True
    spec = SimpleNamespace(image="old-image")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def poll(self):
        return None

    def console_tail(self, n: int = 0) -> str:
        return ""

    async def open_stream(self, port: int, timeout: float = 5.0):
        return await asyncio.open_connection(sock=self.sock)


async def _hello_from(protocol) -> GuestAgent:
    host, guest = socket.socketpair()
    guest.setblocking(False)

    async def answer():
        loop = asyncio.get_running_loop()
        data = b""
        while b"\n" not in data:
            data += await loop.sock_recv(guest, 4096)
        reply = {"id": json.loads(data)["id"], "ok": True, "protocol": protocol}
        await loop.sock_sendall(guest, json.dumps(reply).encode() + b"\n")

    task = asyncio.ensure_future(answer())
    try:
        return await GuestAgent.connect(_OneStreamVm(host), 5)
    finally:
        await task
        guest.close()


async def test_an_agent_of_another_protocol_is_refused_with_what_to_do():
    """An image built by another smol-kernel version speaks another protocol: refused,
    naming the image and the rebuild (the version used to be sent and never checked)."""
    with pytest.raises(VmError, match=r"protocol 3, this smol-kernel speaks \d+.*'old-image'"
                                      r".*image build"):  # fmt: skip
        await _hello_from(3)


async def test_an_agent_of_this_protocol_connects():
    """Control for the above: the same fake, answering this protocol, connects."""
    agent = await _hello_from(P.PROTOCOL_VERSION)
    assert agent.hello["protocol"] == P.PROTOCOL_VERSION
    await agent.close()
