"""Property-based tests of the parsers the guest feeds (hypothesis): the strict message
parser and the output policy, the relay's message pump end to end, the serial mux's framing,
and the DNS/TLS/HTTP readers of the egress guard. No VM.

The invariant: for any bytes from the guest, what reaches the client is either nothing or a
message the client reads as we do -- strict UTF-8 JSON, signed with the kernel's key, of a
type the channel carries -- that the output policy leaves unchanged if asked again; and
the work per input is bounded (every example here has a deadline).

The suite runs a bounded number of examples (``SMOL_FUZZ_EXAMPLES``, 150 by default); a
longer run is the same command with more, e.g.
``SMOL_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz_guest_input.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session

from smol_kernel.egress import dns, log
from smol_kernel.guest import mux as M
from smol_kernel.relay import strict_message, zmtp
from smol_kernel.relay.message_pump import MessageGate, pump_messages
from smol_kernel.relay.output_policy import FILTERED_TYPES, OutputPolicy
from smol_kernel.relay.strict_message import CHANNEL_TYPES, Rejected
from smol_kernel.transport.serial_mux import HostMux

KEY = b"fuzz-key"
EXAMPLES = int(os.environ.get("SMOL_FUZZ_EXAMPLES", "150"))
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=2), suppress_health_check=SLOW_OK)
GREETING = b"\xff" + b"\0" * 7 + b"\x01\x7f\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" * 32

# JSON values as a guest might write them, hostile strings included.
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["<script>x</script>", "<img src=x onerror=y>", "javascript:x",
                     "url(https://evil.test)", "\udcff", "5.3", "2026-12-07T00:00:00Z",
                     "display_data", "stream", "text/html", "application/javascript"]),
)  # fmt: skip
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=20,
)
_MIME = st.sampled_from(["text/plain", "text/html", "text/markdown", "image/svg+xml",
                         "application/javascript", "image/png", "text/latex",
                         "application/vnd.jupyter.widget-view+json", "x/unknown"])  # fmt: skip


@st.composite
def contents(draw):
    kind = draw(st.sampled_from(["bundle", "comm", "free", "stream"]))
    if kind == "bundle":
        data = draw(st.dictionaries(_MIME, _TEXT | _JSON, max_size=4))
        return {"data": data, "metadata": draw(_JSON), "transient": draw(_JSON)}
    if kind == "comm":
        state = draw(st.dictionaries(_TEXT | st.sampled_from(
            ["_model_name", "format", "value", "background", "outputs"]), _JSON | _TEXT,
            max_size=5))  # fmt: skip
        return {"comm_id": draw(_TEXT), "target_name": "jupyter.widget",
                "data": {"state": state, "method": "update"}}  # fmt: skip
    if kind == "stream":
        return {"name": draw(st.sampled_from(["stdout", "stderr", "x"])), "text": draw(_TEXT)}
    return draw(st.dictionaries(_TEXT, _JSON, max_size=5))


def _raw_json(value) -> bytes:
    """As a guest's jupyter_client packs it: a lone surrogate becomes a raw byte."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogateescape")


@st.composite
def guest_messages(draw, channel: str = "iopub") -> list[bytes]:
    """Frames of one message: mostly well formed, then a frame maybe replaced by junk."""
    msg_type = draw(st.sampled_from([*sorted(CHANNEL_TYPES[channel]), "execute_javascript"]))
    header = {"msg_id": draw(_TEXT), "msg_type": msg_type, "session": "s", "username": "u",
              "version": draw(st.sampled_from(["5.3", "4.0", "5.x"])),
              "date": "2026-12-07T00:00:00Z"}  # fmt: skip
    frames = [_raw_json(header), b"{}", b"{}", _raw_json(draw(contents()))]
    if draw(st.booleans()):
        frames[draw(st.integers(0, 3))] = draw(st.binary(max_size=60))
    routing = draw(st.lists(st.binary(max_size=8), max_size=2))
    buffers = draw(st.lists(st.binary(max_size=8), max_size=2))
    return [*routing, zmtp.DELIMITER, strict_message.sign(KEY, "hmac-sha256", frames), *frames,
            *buffers]  # fmt: skip


def check_client_view(frames: list[bytes], channel: str, policy: OutputPolicy | None) -> None:
    """What a client gets: jupyter_client verifies and reads it, strict UTF-8 holds, our own
    parser takes it again, and the policy would not change it a second time."""
    session = Session(key=KEY)
    _, rest = session.feed_identities(frames)
    for part in rest[1:5]:
        part.decode("utf-8")  # (clients decode leniently: there must be nothing to replace)
    msg = session.deserialize(rest)  # raises on a bad signature
    again = strict_message.parse(frames, channel)
    assert again.msg_type == msg["msg_type"] in CHANNEL_TYPES[channel]
    if policy is not None and again.msg_type in FILTERED_TYPES:
        assert OutputPolicy(policy.targets).filter(again.msg_type, again.content) is not None


@FUZZ
@given(guest_messages(), st.booleans())
def test_a_message_either_is_rejected_or_reaches_the_client_as_we_read_it(parts, trusted):
    policy = None if trusted else OutputPolicy(targets=frozenset({"jupyter.widget"}))
    try:
        msg = strict_message.parse(parts, "iopub")
    except Rejected:
        return
    if policy is not None and msg.msg_type in FILTERED_TYPES:
        content = policy.filter(msg.msg_type, msg.content)
        if content is None:
            return
        msg.content = content
    try:
        out = msg.frames(KEY)
    except (ValueError, TypeError):
        return  # the pump drops (and counts) a message it cannot write
    check_client_view(out, "iopub", policy)


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_arbitrary_frames_never_get_past_the_parser_unread(parts):
    try:
        msg = strict_message.parse(parts, "iopub")
    except Rejected:
        return
    check_client_view(msg.frames(KEY), "iopub", None)


def _pump(data: bytes, channel: str) -> bytes:
    """What a client of ``channel`` reads when the guest's end sends ``data``."""

    async def run() -> bytes:
        g_ours, g_theirs = socket.socketpair()
        c_ours, c_theirs = socket.socketpair()
        g_theirs.sendall(data)
        g_theirs.shutdown(socket.SHUT_WR)
        reader, g_writer = await asyncio.open_connection(sock=g_ours)
        _, writer = await asyncio.open_connection(sock=c_ours)
        gate = MessageGate(key=KEY, policy=OutputPolicy(targets=frozenset({"jupyter.widget"})))
        try:
            await asyncio.wait_for(pump_messages(reader, writer, channel, gate), 5)
        except (asyncio.IncompleteReadError, zmtp.ZmtpError, ConnectionError):
            pass
        writer.close()
        c_theirs.setblocking(False)
        got = b""
        try:
            while chunk := c_theirs.recv(1 << 16):
                got += chunk
        except BlockingIOError:
            pass
        for s in (g_theirs, c_theirs):
            s.close()
        g_writer.close()
        return got

    return asyncio.run(run())


def _messages(stream: bytes) -> list[list[bytes]]:
    at, out, parts = 0, [], []
    while at < len(stream):
        flags = stream[at]
        if flags & zmtp.LONG:
            size, at = struct.unpack(">Q", stream[at + 1 : at + 9])[0], at + 9
        else:
            size, at = stream[at + 1], at + 2
        body, at = stream[at : at + size], at + size
        assert len(body) == size, "a frame cut short"
        if flags & zmtp.COMMAND:
            name, _ = zmtp.parse_command(body)
            assert name in (b"READY", b"PING", b"PONG"), name
            continue
        parts.append(body)
        if not flags & zmtp.MORE:
            out.append(parts)
            parts = []
    assert parts == [], "a message cut short"
    return out


@FUZZ
@given(st.lists(guest_messages() | st.binary(max_size=40).map(lambda b: [b]), max_size=6),
       st.binary(max_size=30))  # fmt: skip
def test_the_pump_writes_only_whole_messages_the_client_reads_as_we_do(messages, junk):
    """A guest stream: the handshake, then messages and junk frames, then junk bytes."""
    data = GREETING + zmtp.ready(b"XPUB")
    for parts in messages:
        data += zmtp.frames(parts)
    got = _pump(data + junk, "iopub")
    assert got.startswith(GREETING)
    for frames in _messages(got[64:]):
        check_client_view(frames, "iopub", OutputPolicy(targets=frozenset({"jupyter.widget"})))


@FUZZ
@given(st.binary(max_size=300))
def test_the_pump_survives_any_bytes_after_the_greeting(data):
    got = _pump(GREETING + data, "shell")
    for frames in _messages(got[64:]):
        check_client_view(frames, "shell", None)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3), st.binary(max_size=20)),
                max_size=40),
       st.binary(max_size=20))  # fmt: skip
def test_the_mux_takes_any_frames_in_bounded_work(frames, tail):
    """Any frames (kinds, streams, sizes) then junk: the mux either handles each whole
    frame or stops at a protocol error; it never holds more than the input."""

    async def run() -> None:
        mux = HostMux(Path("/nonexistent/mux.sock"))  # (never listened on)
        buf = bytearray(b"".join(M.frame(k, s, p) for k, s, p in frames) + tail)
        size = len(buf)
        try:
            used = await mux._frames(buf)
        except M.MuxError:
            return
        assert 0 <= used <= size
        rest = bytes(buf[used:])
        assert len(rest) < M.HEADER.size or M.HEADER.unpack_from(rest)[2] > len(rest) - 9

    asyncio.run(run())


@FUZZ
@given(st.binary(max_size=600))
def test_the_dns_readers_take_any_datagram(data):
    query = dns.parse_query(data)
    if query is not None:
        assert isinstance(query.name, str)
        dns.nxdomain(data, query)
    answer = dns.parse_response(data)
    if answer is not None:
        dns.chain_addresses(answer)


_HTTP = st.builds(lambda host, rest: b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n" + rest,
                  st.binary(max_size=40), st.binary(max_size=80))  # fmt: skip
_TLS = st.builds(lambda body: b"\x16\x03\x01" + struct.pack(">H", len(body)) + body,
                 st.binary(max_size=300))  # fmt: skip


@FUZZ
@given(st.binary(max_size=600) | _HTTP | _TLS)
def test_the_tls_and_http_readers_take_any_stream(data):
    state, protocol, names = log.classify(data)
    assert state in ("more", "done", "bad", "other") and protocol in ("tls", "http", "tcp")
    assert isinstance(names, list)


@pytest.mark.parametrize("seed", [b"", b"\x00" * 20])
def test_the_fuzz_probes_see_a_rejection(seed):
    """Control: the checks above can fail -- a frame a client would decode leniently is
    caught by ``check_client_view``."""
    frames = [b"t", zmtp.DELIMITER, b"", b'{"msg_type": "stream", "x": "\xff"}', b"{}", b"{}",
              b"{}" + seed]  # fmt: skip
    with pytest.raises((UnicodeDecodeError, ValueError, AssertionError, KeyError)):
        check_client_view(frames, "iopub", None)
