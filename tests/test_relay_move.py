"""Moving a client's connections from one kernel to another under it (what a rewind does),
without a VM: two real ipykernels on the host with the same key stand in for the old and
the new guest, our relay sits between them and a real jupyter_client, which never
reconnects by itself."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import uuid

import pytest
from jupyter_client.manager import AsyncKernelManager

from smol_kernel.guest.protocol import CHANNEL_PORTS
from smol_kernel.ioloop import on_io_loop
from smol_kernel.relay import KernelRelay
from smol_kernel.relay.message_pump import MessageGate
from smol_kernel.relay.output_policy import OutputPolicy

from .web_helpers import listening_relay


async def _local_kernel(key: bytes) -> AsyncKernelManager:
    """A local ipykernel that answers. Its ports are picked free and then bound by the
    kernel, so another process (the other test worker) can take one in between: retry."""
    for attempt in range(3):
        km = AsyncKernelManager(kernel_name="python3")
        km.session.key = key
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=30)
            return km
        except RuntimeError:
            if attempt == 2:
                raise
            await km.shutdown_kernel(now=True)
        finally:
            kc.stop_channels()
    raise AssertionError("unreachable")


def _opener(km: AsyncKernelManager, slow_iopub: float = 0.0):
    """Streams to ``km``'s ports; ``slow_iopub``: seconds an iopub stream takes to open
    (a guest under TCG answers a stream's open in a few to a few hundred milliseconds)."""
    info = km.get_connection_info()
    by_vport = {CHANNEL_PORTS[ch]: int(info[f"{ch}_port"]) for ch in CHANNEL_PORTS}

    async def open_stream(vport: int, timeout: float = 5.0):
        if vport == CHANNEL_PORTS["iopub"]:
            await asyncio.sleep(slow_iopub)
        return await asyncio.open_connection("127.0.0.1", by_vport[vport], limit=1 << 20)

    return open_stream


@contextlib.asynccontextmanager
async def two_kernels_one_relay(slow_iopub: float = 0.0):
    key = uuid.uuid4().hex.encode()
    old, new = await asyncio.gather(_local_kernel(key), _local_kernel(key))
    gate = MessageGate(key=key, policy=OutputPolicy())
    relay, ports = listening_relay(gate)

    async def serve():
        await relay.start_serving(_opener(old, slow_iopub))

    await on_io_loop(serve())
    client = old.client(**{f"{ch}_port": p for ch, p in ports.items()})
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=30)
        yield old, new, relay, client
    finally:
        client.stop_channels()
        await on_io_loop(relay.close())
        await asyncio.gather(old.shutdown_kernel(now=True), new.shutdown_kernel(now=True))


async def _reply(client, msg_id: str, timeout: float = 20.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        msg = await client.get_shell_msg(timeout=max(0.01, left))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


async def _outputs(client, msg_id: str, timeout: float = 20.0) -> str:
    """Stream text of one request, until its idle status."""
    text = ""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        msg = await client.get_iopub_msg(timeout=max(0.01, left))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return text


async def test_a_client_keeps_its_connections_when_the_kernel_under_them_changes():
    async with two_kernels_one_relay() as (_old, new, relay, client):
        # jupyter_client's heartbeat makes a new socket when a beat is 1 s late, which a
        # loaded host causes now and then; this test counts connections, so allow it 5 s.
        client.hb_channel.time_to_dead = 5.0
        mid = client.execute("where = 'old'; print(where)")
        assert await _outputs(client, mid) == "old\n"
        await _reply(client, mid)
        # the new kernel has its own state (a client of its own sets it, not through us)
        direct = new.client()
        direct.start_channels()
        await direct.wait_for_ready(timeout=30)
        await _reply(direct, direct.execute("where = 'new'"))
        direct.stop_channels()

        await on_io_loop(_hold(relay))
        held = client.execute("print(where)")  # sent, held in the relay
        with pytest.raises(queue.Empty):
            await client.get_shell_msg(timeout=1.0)
        assert await on_io_loop(_unanswered(relay)) == 0  # held, not sent

        moved = await on_io_loop(_move(relay, _opener(new)))
        assert moved == 5  # shell, iopub, stdin, control, hb: none reconnected
        assert await _outputs(client, held) == "new\n"  # iopub subscription replayed
        assert (await _reply(client, held))["content"]["status"] == "ok"
        again = client.execute("print(where * 2)")
        assert await _outputs(client, again) == "newnew\n"
        assert client.hb_channel.is_beating()
        assert relay.connections == 5  # the same five connections, moved


async def test_requests_the_old_kernel_never_answered_go_to_the_new_one():
    async with two_kernels_one_relay() as (_old, new, relay, client):
        slow = client.execute("import time; time.sleep(30)")  # the old kernel never answers
        behind = client.execute("print('ran')")  # queued behind it, in the old kernel
        await asyncio.sleep(1.0)
        assert await on_io_loop(_unanswered(relay)) == 2
        moved = await on_io_loop(_move(relay, _opener(new), skip={slow}))
        assert moved == 5
        assert await _outputs(client, behind) == "ran\n"  # sent again, ran in the new one
        assert (await _reply(client, behind))["content"]["status"] == "ok"
        assert await on_io_loop(_unanswered(relay)) == 0


async def test_a_connection_that_cannot_move_is_closed_and_the_client_reconnects():
    """Positive control for the moves above: a guest stream that ends without a move
    closes the client's connection (zmq then reconnects), it is not silently kept."""
    async with two_kernels_one_relay() as (_old, _new, relay, client):
        before = relay.connections
        await on_io_loop(_cut_guest_streams(relay))
        await asyncio.sleep(1.0)
        mid = client.execute("print('back')")
        assert await _outputs(client, mid) == "back\n"
        assert relay.connections > before  # new connections, not moved ones


async def _hold(relay: KernelRelay) -> None:
    relay.hold_requests()


async def _unanswered(relay: KernelRelay) -> int:
    return relay.unanswered_requests()


async def _move(relay: KernelRelay, opener, skip: set[str] = frozenset()) -> int:
    relay.hold_requests()
    await relay.detach()
    moved = await relay.attach(opener)
    relay.resend_unanswered(set(skip))
    relay.release()
    return moved


async def _cut_guest_streams(relay: KernelRelay) -> None:
    for link in list(relay._links):
        if link.g_writer is not None:
            link.g_writer.close()


async def _status_seen(client, msg_id: str, timeout: float) -> bool:
    """Whether iopub brought the kernel's busy status for request ``msg_id``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            msg = await client.get_iopub_msg(timeout=left)
        except queue.Empty:
            return False
        if msg["msg_type"] == "status" and msg["parent_header"].get("msg_id") == msg_id:
            return True
    return False


async def test_a_new_clients_first_request_waits_until_its_iopub_has_subscribed():
    """Issue 32: a client that sends its first request as soon as it connects (what
    jupyter_client's wait_for_ready does) lost that request's busy/idle to the race with
    its iopub subscription, and retried after 0.2 s. The relay holds a new client's first
    shell request until an iopub link that connected with it has subscribed; here iopub
    streams take 0.1 s to open, as in a busy VM. Control: a second request on a subscribed
    client sees its status (the probe works)."""
    async with two_kernels_one_relay(slow_iopub=0.1) as (old, _new, _relay, connected):
        ports = {f"{ch}_port": getattr(connected, f"{ch}_port") for ch in CHANNEL_PORTS}
        missed = 0
        for _ in range(6):
            client = old.client(**ports)
            client.start_channels()
            try:
                if not await _status_seen(client, client.kernel_info(), 5.0):
                    missed += 1
                assert await _status_seen(client, client.kernel_info(), 5.0), "the control"
            finally:
                client.stop_channels()
        assert missed == 0, f"{missed} of 6 new clients missed their first request's status"
