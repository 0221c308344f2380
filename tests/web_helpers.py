"""Helpers for tests that talk to real Jupyter servers over HTTP and websockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import websocket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_relay(gate) -> tuple:
    """A ``KernelRelay`` on 127.0.0.1 bound to five free ports, and those ports. Another
    test worker can take a port between ``free_port`` and the bind: then five new ones."""
    from smol_kernel.guest.protocol import CHANNEL_PORTS
    from smol_kernel.relay import KernelRelay, RelayError

    for attempt in range(5):
        ports = {ch: free_port() for ch in CHANNEL_PORTS}
        relay = KernelRelay("tcp", "127.0.0.1", ports, gate)
        try:
            relay.bind()
            return relay, ports
        except RelayError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def server_env() -> dict[str, str]:
    """The environment a server we start as a subprocess gets: ours, minus secrets."""
    keep = ("PATH", "HOME", "SMOL_KERNEL_RUNTIME_DIR", "XDG_CACHE_HOME", "PYTHONPATH")
    return {k: os.environ[k] for k in keep if k in os.environ}


def wait_until_up(
    answers: Callable[[], bool],
    proc: subprocess.Popen,
    log: Path | None = None,
    timeout: float = 60.0,
    interval: float = 0.3,
) -> None:
    """Poll ``answers()`` until it is true (a refused or failed connection counts as not
    yet); fail with the end of the server's ``log`` if ``proc`` exits or ``timeout``
    passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if answers():
                return
        except OSError:  # requests.ConnectionError is one too
            pass
        if proc.poll() is not None or time.monotonic() >= deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            state = f"exited {proc.returncode}" if proc.poll() is not None else "still starting"
            raise AssertionError(f"the server did not come up ({state}):\n{tail}")
        time.sleep(interval)


def ws_send_execute(ws_url: str, token: str, code: str, timeout: float = 120):
    """Open a kernel's websocket (jupyter_server, Hub proxy or Kernel Gateway) and send one
    execute_request; returns ``(ws, msg_id)``, the socket still open."""
    ws = websocket.create_connection(ws_url, timeout=timeout,
                                     header=[f"Authorization: token {token}"])  # fmt: skip
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }))  # fmt: skip
    return ws, msg_id


def ws_execute(ws_url: str, token: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` over a kernel's websocket; its stdout once the kernel is idle again."""
    ws, msg_id = ws_send_execute(ws_url, token, code, timeout)
    try:
        out = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return out
        raise TimeoutError(f"no idle status for {code!r}")
    finally:
        ws.close()


# JupyterLab's websocket protocol (jupyter_server's v1: binary, no server-side rate limit).
WS_V1 = "v1.kernel.websocket.jupyter.org"


def ws_v1_encode(channel: str, msg: dict) -> bytes:
    names = ("header", "parent_header", "metadata", "content")
    parts = [channel.encode()] + [json.dumps(msg[k]).encode() for k in names]
    count = len(parts) + 1
    offsets, at = [], 8 * (count + 1)
    for p in parts:
        offsets.append(at)
        at += len(p)
    offsets.append(at)
    head = count.to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return head + b"".join(parts)


def ws_v1_decode(data: bytes) -> tuple[str, dict]:
    """(channel, message) of one v1 frame (buffers ignored)."""
    count = int.from_bytes(data[:8], "little")
    offsets = [int.from_bytes(data[8 + 8 * i : 16 + 8 * i], "little") for i in range(count)]
    parts = [data[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
    names = ("header", "parent_header", "metadata", "content")
    msg = {name: json.loads(part) for name, part in zip(names, parts[1:5], strict=False)}
    msg["msg_type"] = msg.get("header", {}).get("msg_type")
    return parts[0].decode(), msg


def ws_v1_connect(ws_url: str, token: str, timeout: float = 120):
    return websocket.create_connection(ws_url, timeout=timeout, subprotocols=[WS_V1],
                                       header=[f"Authorization: token {token}"])  # fmt: skip


def ws_v1_execute_request(code: str, session: str) -> bytes:
    return ws_v1_encode("shell", {
        "header": {"msg_id": uuid.uuid4().hex, "username": "test", "session": session,
                   "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    })  # fmt: skip
