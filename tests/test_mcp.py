"""``smol-kernel mcp`` through the MCP SDK's own clients: stdio with a real VM behind it,
and the streamable HTTP transport's bearer token."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time

import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from .conftest import processes_mentioning, runtime_entries
from .kernel_helpers import tiny_png
from .web_helpers import free_port, server_env, wait_until_up

TOOLS = {"run_python", "run_shell", "interrupt", "restart", "read_file", "write_file",
         "list_files", "list_sessions", "close_session", "checkpoint", "rewind",
         "fork", "install_packages"}  # fmt: skip


@pytest.mark.vm
async def test_stdio_tools_end_to_end():
    before = runtime_entries()
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "smol_kernel.cli", "mcp", "--pool-size", "0", "--max-output-chars", "5000"],
        env=server_env(),
    )
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async with stdio_client(params) as (read, write), ClientSession(read, write) as mcp:
        await mcp.initialize()
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
        assert set(tools) == TOOLS
        assert tools["close_session"].annotations.destructive_hint is True
        assert tools["read_file"].annotations.read_only_hint is True
        assert tools["run_python"].annotations.open_world_hint is False  # network is off
        assert tools["install_packages"].annotations.open_world_hint is True  # the host's

        png = base64.b64encode(tiny_png()).decode()
        result = await mcp.call_tool("run_python", {"code": (
            "import base64, time\nfrom IPython.display import Image, display\n"
            "print('working', flush=True)\ntime.sleep(5)\n"
            f"display(Image(data=base64.b64decode('{png}')))\n'x' * 9000"
        )}, progress_callback=on_progress)  # fmt: skip
        assert not result.is_error
        text, image = result.content
        assert text.text.startswith("working") and "[image 1: image/png, attached]" in text.text
        assert "[output truncated" in text.text and len(text.text) < 5500
        assert image.type == "image" and base64.b64decode(image.data) == tiny_png()
        assert any("running for" in m and "working" in m for m in progress), progress

        result = await mcp.call_tool("run_python", {"code": "1/0"})
        assert result.is_error and "ZeroDivisionError" in result.content[0].text

        blob = bytes(range(256))
        await mcp.call_tool("write_file", {"path": "d/b.bin", "encoding": "base64",
                                           "content": base64.b64encode(blob).decode()})  # fmt: skip
        got = await mcp.call_tool("read_file", {"path": "d/b.bin", "encoding": "base64"})
        assert base64.b64decode(got.content[0].text) == blob
        listing = (await mcp.call_tool("list_files", {"path": "d"})).content[0].text
        assert "b.bin" in listing and "256" in listing
        shell = (await mcp.call_tool("run_shell", {"command": "ls d; exit 4"})).content[0].text
        assert shell.splitlines() == ["exit code 4", "b.bin"]
        missing = await mcp.call_tool("read_file", {"path": "nope.txt"})
        assert missing.is_error and "No such file" in missing.content[0].text

        sessions = (await mcp.call_tool("list_sessions", {})).content[0].text
        assert sessions.startswith("default: idle, isolation tcg") or "isolation kvm" in sessions
        vm_dirs = runtime_entries() - before
        assert len(vm_dirs) == 1
        closed = await mcp.call_tool("close_session", {"session": "default"})
        assert "closed" in closed.content[0].text
        assert (await mcp.call_tool("list_sessions", {})).content[0].text.startswith("no sessions")
        assert runtime_entries() == before
        unknown = await mcp.call_tool("interrupt", {"session": "nope"})
        assert unknown.is_error and "no session named 'nope'" in unknown.content[0].text
        await mcp.call_tool("run_python", {"code": "1", "session": "second"})
    # The server exited with the client: the second session's VM went with it.
    deadline = time.monotonic() + 30
    while runtime_entries() != before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert runtime_entries() == before
    assert processes_mentioning("smol_kernel.cli mcp") == []


async def test_http_transport_requires_the_bearer_token():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "smol_kernel.cli", "mcp", "--pool-size", "0",
         "--http", f"127.0.0.1:{port}", "--token", "s3cret"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        wait_until_up(lambda: bool(socket.create_connection(("127.0.0.1", port), 1).close()
                                   or True), proc)  # fmt: skip
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"}}}  # fmt: skip
        accept = {"accept": "application/json, text/event-stream"}
        async with httpx2.AsyncClient() as http:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                            {"authorization": "Bearer s3cretX"}):  # fmt: skip
                r = await http.post(url, json=init, headers={**accept, **headers})
                assert r.status_code == 401, headers
                assert r.headers["www-authenticate"].startswith("Bearer ")
                assert "invalid_token" in r.headers["www-authenticate"]
            # No OAuth metadata that would send a client to an authorization server
            r = await http.get(f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource")
            assert r.status_code == 404
        async with (
            httpx2.AsyncClient(headers={"authorization": "Bearer s3cret"}) as http,
            streamable_http_client(url, http_client=http) as (read, write),
            ClientSession(read, write) as mcp,
        ):
            await mcp.initialize()
            assert {t.name for t in (await mcp.list_tools()).tools} == TOOLS
    finally:
        proc.terminate()
        proc.wait(20)


def test_http_without_token_prints_a_generated_one():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "smol_kernel.cli", "mcp", "--pool-size", "0",
         "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        assert "bearer token" in line
        token = line.rsplit(" ", 1)[1].strip()
        assert len(token) >= 32
    finally:
        proc.terminate()
        proc.wait(20)


async def test_the_http_token_check_takes_any_address_and_the_token_as_sent():
    """The SDK's auth needs an issuer URL: an IPv6 listen address must not break it; a
    token that is not ASCII matches as the bytes a client sends (UTF-8)."""
    from smol_kernel.mcp_server import Sessions, StaticToken, build_server

    for host in ("::1", "127.0.0.1", "0.0.0.0"):
        build_server(Sessions({}, 1), http=(host, 8765), token="t")
    verifier = StaticToken("pässwört")
    sent = "pässwört".encode().decode("latin-1")  # what Starlette hands the verifier
    assert await verifier.verify_token(sent) is not None
    for wrong in ("pässwört", "pässwört ", "x", "", "\u2603"):
        assert await verifier.verify_token(wrong) is None
    with pytest.raises(ValueError, match="needs a bearer token"):
        StaticToken("")
