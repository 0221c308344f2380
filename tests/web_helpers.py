"""Helpers for tests that talk to real Jupyter servers over HTTP and websockets."""

from __future__ import annotations

import json
import socket
import time
import uuid

import websocket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
