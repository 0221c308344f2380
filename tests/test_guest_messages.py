"""The relay fails closed on what a guest sends (smol_kernel/relay/strict_message.py,
message_pump.py): a fake guest -- any bytes we like on a kernel port -- behind a real
KernelRelay, and a client that reads what the relay passes. No VM: the guest's bytes are the
whole input, so every lie is one line here. A real ipykernel doing the same from a cell, and
JupyterLab in a browser, are in tests/test_output_policy.py and tests/test_browser.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from smol_kernel.ioloop import on_io_loop
from smol_kernel.relay import strict_message, zmtp
from smol_kernel.relay.message_pump import MAX_MESSAGE_BYTES, MessageGate
from smol_kernel.relay.output_policy import OutputPolicy

from .web_helpers import listening_relay

KEY = b"guest-and-host-key"
GREETING = b"\xff" + b"\0" * 7 + b"\x01\x7f\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" * 32


def ready(socket_type: bytes = b"XPUB") -> bytes:
    return zmtp.ready(socket_type)


def message(msg_type="display_data", content=None, *, header=None, raw=None, routing=(b"t",),
            buffers=(), parent=b"{}", metadata=b"{}") -> bytes:  # fmt: skip
    """One message as a guest's jupyter_client would frame it; ``raw`` replaces frames."""
    head = {"msg_id": "m1", "msg_type": msg_type, "session": "s", "username": "u",
            "version": "5.3", "date": "2026-12-07T20:33:19.123456Z", **(header or {})}  # fmt: skip
    body = content if content is not None else {"data": {"text/plain": "hi"}, "metadata": {}}
    signed = [json.dumps(head).encode(), parent, metadata, json.dumps(body).encode()]
    for i, frame in (raw or {}).items():
        signed[i] = frame
    sig = strict_message.sign(KEY, "hmac-sha256", signed)
    return zmtp.frames([*routing, zmtp.DELIMITER, sig, *signed, *buffers])


async def relayed(script: bytes, channel: str = "iopub", policy: bool = True,
                  gate: MessageGate | None = None) -> tuple[bytes, MessageGate]:  # fmt: skip
    """What a raw client connected to the relay's ``channel`` port reads when the guest's
    end of that channel sends ``script`` and closes."""
    gate = gate or MessageGate(key=KEY, policy=OutputPolicy() if policy else None)
    relay, ports = listening_relay(gate)

    async def open_stream(vport: int, timeout: float = 5.0):
        ours, theirs = socket.socketpair()
        theirs.setblocking(True)

        def guest() -> None:
            with contextlib.suppress(OSError):
                theirs.sendall(script)
                theirs.shutdown(socket.SHUT_WR)
                while theirs.recv(65536):  # the client's bytes, unread
                    pass
            theirs.close()

        threading.Thread(target=guest, daemon=True).start()  # (not the loop's few workers)
        return await asyncio.open_connection(sock=ours, limit=1 << 20)

    async def run() -> bytes:
        await relay.start_serving(open_stream)
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[channel])
        got = b""
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
                got += chunk
        writer.close()
        await relay.close()
        return got

    return await on_io_loop(run()), gate


def messages_in(stream: bytes) -> list[list[bytes]]:
    """The multipart messages a client read after the greeting and READY."""
    assert stream[:64] == GREETING
    at, out, parts = 64, [], []
    while at < len(stream):
        flags = stream[at]
        if flags & zmtp.LONG:
            size, at = struct.unpack(">Q", stream[at + 1 : at + 9])[0], at + 9
        else:
            size, at = stream[at + 1], at + 2
        body, at = stream[at : at + size], at + size
        if flags & zmtp.COMMAND:
            out.append([b"COMMAND", body])
            continue
        parts.append(body)
        if not flags & zmtp.MORE:
            out.append(parts)
            parts = []
    return out


def verified(parts: list[bytes]) -> dict:
    """A message as jupyter_client reads it, its signature checked with the kernel's key."""
    session = Session(key=KEY)
    _, msg_list = session.feed_identities(parts)
    return session.deserialize(msg_list)


async def test_a_message_that_parses_is_rewritten_and_signed_with_our_key():
    evil = {"data": {"text/html": "<script>x</script><b>ok</b>"}, "metadata": {}}
    got, gate = await relayed(GREETING + ready() + message(content=evil))
    commands, msg = messages_in(got)
    assert commands[0] == b"COMMAND" and b"XPUB" in commands[1]
    m = verified(msg)
    assert m["msg_type"] == "display_data" and "<script" not in m["content"]["data"]["text/html"]
    assert "<b>ok</b>" in m["content"]["data"]["text/html"] and gate.rejected == 0


async def test_an_undecodable_header_is_dropped_not_relayed():
    """The attack of issue 30: a username that is not UTF-8 made the header unreadable, and
    the message (JavaScript and all) went on unfiltered. Control: the same message with a
    readable header passes, filtered."""
    js = {"data": {"application/javascript": "alert(1)", "text/html": "<script>x</script>"},
          "metadata": {}}  # fmt: skip
    head = json.dumps({"msg_id": "m1", "msg_type": "display_data", "session": "s",
                       "username": "\udcff", "version": "5.3"}, ensure_ascii=False)  # fmt: skip
    bad = message(content=js, raw={0: head.encode("utf-8", "surrogateescape")})
    assert b"\xff" in bad
    good = message(content=js, header={"msg_id": "good"})
    got, gate = await relayed(GREETING + ready() + bad + good)
    msgs = messages_in(got)[1:]
    assert len(msgs) == 1 and verified(msgs[0])["header"]["msg_id"] == "good"
    assert b"alert(1)" not in got and b"<script" not in got
    assert gate.rejected == 1


# Each of these is not a Jupyter message the guest may send: dropped, counted; the valid
# message after it still passes (the connection stays).
HEAD = b'"msg_id": "1", "msg_type": "display_data", "version": "5.3"'
ODD = {
    "header not UTF-8": message(raw={0: b'{"username": "\xc0", ' + HEAD + b"}"}),
    "header with a BOM": message(raw={0: b"\xef\xbb\xbf{" + HEAD + b"}"}),
    "lone surrogate escape": message(header={"username": "\udcff"}),
    "NaN in the content": message(raw={3: b'{"data": {"text/plain": NaN}, "metadata": {}}'}),
    "header is a list": message(raw={0: b'["display_data"]'}),
    "two JSON documents": message(raw={0: b"{" + HEAD + b"}{}"}),
    "no msg_type": message(header={"msg_type": None}),
    "unknown msg_type": message("execute_javascript"),
    "reply on iopub": message("execute_reply", {"status": "ok"}),
    "no delimiter": zmtp.frames([b"t", b"sig", b"{}", b"{}", b"{}", b"{}"]),
    "frames missing": zmtp.frames([b"t", zmtp.DELIMITER, b"sig", b"{}"]),
    "nine routing frames": message(routing=[b"t"] * 9),
    "a 2 KiB topic": message(routing=[b"t" * 2048]),
    "buffers on display_data": message(buffers=[b"\x00" * 10]),
    "stream named stdnot": message("stream", {"name": "stdnot", "text": "x"}),
    "stream text not a string": message("stream", {"name": "stdout", "text": ["<b>"]}),
    "status state invented": message("status", {"execution_state": "<img>"}),
    "error traceback of dicts": message("error", {"ename": "E", "evalue": "", "traceback": [{}]}),
    "date not ISO": message(header={"date": "tomorrow"}),
    "date with markup": message(header={"date": "2026-12-07<img src=x>"}),
    "protocol version 4": message(header={"version": "4.1"}),
    "no protocol version": message(raw={0: b'{"msg_id": "1", "msg_type": "display_data"}'}),
    "msg_id a number": message(header={"msg_id": 7}),
    "execution_count a bool": message("execute_input", {"code": "x", "execution_count": True}),
    "parent without msg_id": message(parent=b'{"msg_type": "execute_request"}'),
    "metadata a string": message(metadata=b'"x"'),
    # (a copy by assignment in the browser makes it the copy's prototype)
    "a __proto__ key": message(
        content={"data": {"application/json": {"__proto__": {"x": 1}}}, "metadata": {}}
    ),
    "an escaped __proto__ key": message(
        raw={3: b'{"data": {"text/plain": "x"}, "metadata": {"\\u005f_proto__": {}}}'}
    ),
}


@pytest.mark.parametrize("name", list(ODD))
async def test_what_is_not_a_jupyter_message_is_dropped_and_counted(name):
    after = message("stream", {"name": "stdout", "text": "after"}, header={"msg_id": "after"})
    got, gate = await relayed(GREETING + ready() + ODD[name] + after)
    msgs = messages_in(got)[1:]
    assert [verified(m)["header"]["msg_id"] for m in msgs] == ["after"], name
    assert gate.rejected == 1


async def test_dates_as_kernels_and_clients_write_them_pass():
    """JupyterLab's ``toISOString()``, jupyter_client's isoformat and the ``str(datetime)``
    a %rewind cell's header comes back with (a space, ``+00:00``) are all dates."""
    dates = ["2026-12-07T20:33:19.123Z", "2026-12-07T20:33:19.123456+00:00",
             "2026-12-07 20:33:19.123456+00:00", "2026-12-07T20:33:19", ""]  # fmt: skip
    script = GREETING + ready()
    for i, date in enumerate(dates):
        parent = json.dumps({"msg_id": f"p{i}", "msg_type": "execute_request", "date": date})
        script += message("stream", {"name": "stdout", "text": "x"}, header={"msg_id": str(i)},
                          parent=parent.encode())  # fmt: skip
    got, gate = await relayed(script)
    assert len(messages_in(got)) == 1 + len(dates) and gate.rejected == 0


async def test_text_messages_keep_their_bytes_and_the_guests_signature():
    """A stream message goes on as it came once it parsed: the same content bytes, and the
    guest's signature where every signed frame came out the same (no second HMAC for a
    large print)."""
    stream = message("stream", {"name": "stdout", "text": "é " * 10})
    got, _ = await relayed(GREETING + ready() + stream)
    (_, msg) = messages_in(got)
    assert zmtp.frames(msg) == stream
    # a header written another way is written again, and signed again
    head = {"msg_id": "m1", "msg_type": "stream", "session": "s", "version": "5.3"}
    spaced = json.dumps(head, indent=1)
    odd = message("stream", {"name": "stdout", "text": "x"}, raw={0: spaced.encode()})
    got, _ = await relayed(GREETING + ready() + odd)
    (_, msg) = messages_in(got)
    assert (
        msg != messages_in(GREETING + ready() + odd)[1] and verified(msg)["content"]["text"] == "x"
    )


async def test_a_wrong_guest_signature_is_never_mended_into_a_right_one():
    """The guest's signature is only kept when it is hex of the right size; a bad one is
    kept bad (clients refuse it), never replaced by ours over the same bytes."""
    stream = message("stream", {"name": "stdout", "text": "x"})
    parts = messages_in(GREETING + ready() + stream)[1]
    parts[2] = b"0" * 64  # a well-formed, wrong signature
    got, _ = await relayed(GREETING + ready() + zmtp.frames(parts))
    (_, msg) = messages_in(got)
    assert msg[2] == b"0" * 64
    with pytest.raises(ValueError, match="Invalid Signature"):
        verified(msg)
    parts[2] = b"not hex at all"
    got, _ = await relayed(GREETING + ready() + zmtp.frames(parts))
    (_, msg) = messages_in(got)
    assert verified(msg)["content"]["text"] == "x"  # signed by us: the bytes are ours


async def test_commands_after_the_handshake_are_dropped_but_heartbeats():
    ping = zmtp.command(b"PING", b"\x00\x10ctx")
    error = zmtp.command(b"ERROR", b"\x05oops!")
    sub = zmtp.command(b"SUBSCRIBE", b"")
    got, gate = await relayed(GREETING + ready() + error + ping + sub + message())
    cmds = [m for m in messages_in(got) if m[0] == b"COMMAND"]
    assert [c[1][1 : 1 + c[1][0]] for c in cmds] == [b"READY", b"PING"]
    assert gate.rejected == 2


@pytest.mark.parametrize(
    "handshake",
    [
        pytest.param(GREETING[:12] + b"CURVE".ljust(20, b"\0") + GREETING[32:], id="curve"),
        pytest.param(GREETING[:10] + b"\x02" + GREETING[11:], id="zmtp2"),
        pytest.param(GREETING[:40] + b"\x01" + GREETING[41:], id="filler"),
        pytest.param(GREETING + ready(b"ROUTER"), id="wrong-socket-type"),
        pytest.param(GREETING + message(), id="no-ready"),
        pytest.param(GREETING + b"\x06" + struct.pack(">Q", 1 << 40), id="huge-command"),
        pytest.param(GREETING + ready() + b"\x03" + struct.pack(">Q", 1 << 62), id="huge-frame"),
    ],
)
async def test_a_guest_that_breaks_zmtp_gets_nothing_past_the_first_bad_byte(handshake):
    got, _ = await relayed(handshake + message(content={"data": {"text/plain": "SEEN"}}))
    assert b"SEEN" not in got
    assert GREETING.startswith(got) or got == GREETING + ready()


async def test_a_message_over_the_cap_is_skipped_and_the_connection_stays():
    big = message("stream", {"name": "stdout", "text": "x" * (MAX_MESSAGE_BYTES + 10)})
    after = message("stream", {"name": "stdout", "text": "after"}, header={"msg_id": "after"})
    got, gate = await relayed(GREETING + ready() + big + after)
    msgs = messages_in(got)[1:]
    assert [verified(m)["header"]["msg_id"] for m in msgs] == ["after"]
    assert gate.rejected == 1


async def test_trusted_outputs_still_parse_strictly():
    """trusted_outputs turns the output policy off, not the parsing: JavaScript passes as
    sent, an unreadable header still does not."""
    js = {"data": {"application/javascript": "alert(1)"}, "metadata": {}}
    bad = message(content=js, raw={0: b'{"msg_type":"display_data","msg_id":"\xff"}'})
    got, gate = await relayed(GREETING + ready() + bad + message(content=js), policy=False)
    (_, msg) = messages_in(got)
    assert verified(msg)["content"]["data"]["application/javascript"] == "alert(1)"
    assert gate.rejected == 1


async def test_shell_replies_and_stdin_requests_by_channel():
    reply = message("execute_reply", {"status": "ok", "execution_count": 1}, routing=())
    stream_on_shell = message("stream", {"name": "stdout", "text": "x"}, routing=())
    got, _ = await relayed(GREETING + ready(b"ROUTER") + stream_on_shell + reply, "shell")
    assert [verified(m)["msg_type"] for m in messages_in(got)[1:]] == ["execute_reply"]
    prompt = message("input_request", {"prompt": "name? ", "password": False},
                     routing=())  # fmt: skip
    got, _ = await relayed(GREETING + ready(b"ROUTER") + prompt, "stdin")
    assert [verified(m)["msg_type"] for m in messages_in(got)[1:]] == ["input_request"]


async def test_a_real_zmq_client_gets_the_rewritten_message():
    """pyzmq's SUB socket (libzmq) completes the handshake we wrote and verifies our
    signature through jupyter_client's Session."""
    gate = MessageGate(key=KEY, policy=OutputPolicy())
    relay, ports = listening_relay(gate)
    script = GREETING + ready() + message(content={"data": {"text/html": "<b onclick=x>b</b>"},
                                                   "metadata": {}})  # fmt: skip

    async def open_stream(vport: int, timeout: float = 5.0):
        ours, theirs = socket.socketpair()

        def guest() -> None:
            """As libzmq does it: the signature, the rest of the greeting once the peer's
            signature came, READY (and the message) once its whole greeting came."""
            got = b""
            with contextlib.suppress(OSError):
                theirs.sendall(script[:10])
                while len(got) < 10:
                    got += theirs.recv(1 << 16)
                theirs.sendall(script[10:64])
                while len(got) < 64:
                    got += theirs.recv(1 << 16)
                theirs.sendall(script[64:])
                while theirs.recv(65536):
                    pass
            theirs.close()

        threading.Thread(target=guest, daemon=True).start()  # (not the loop's few workers)
        return await asyncio.open_connection(sock=ours, limit=1 << 20)

    async def serve() -> None:
        await relay.start_serving(open_stream)

    await on_io_loop(serve())
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{ports['iopub']}")
        parts = await asyncio.wait_for(sub.recv_multipart(), 10)
        m = verified(parts)
        assert m["content"]["data"]["text/html"] == "<b>b</b>"
    finally:
        ctx.destroy(linger=0)
        await on_io_loop(relay.close())


class CountingBuffer(bytearray):
    """A FrameInput buffer that counts the reads of it (the frame scans)."""

    reads = 0

    def __getitem__(self, key):
        CountingBuffer.reads += 1
        return super().__getitem__(key)


async def test_a_message_arriving_a_few_bytes_at_a_time_is_scanned_once():
    """Review of issue 30: every read of the guest's bytes scanned the buffered part of a
    message again from its first frame (4,000 one-byte frames: 2 ms a read, the guest
    choosing the reads). Now a scan goes on from where the last one stopped."""
    from smol_kernel.relay.message_pump import MAX_FRAMES, FrameInput

    parts = [b"x"] * (MAX_FRAMES - 1)
    stream = zmtp.frames(parts)
    reader = asyncio.StreamReader()
    inp = FrameInput(reader)
    inp.buf = CountingBuffer()
    CountingBuffer.reads = 0
    got = None
    for at in range(0, len(stream), 16):
        reader.feed_data(stream[at : at + 16])
        await inp.fill()
        got = inp.whole_message()
    assert got == parts, "the message, whole, once its last byte is here"
    assert CountingBuffer.reads < 4 * len(parts), CountingBuffer.reads
