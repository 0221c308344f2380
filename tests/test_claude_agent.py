"""The Claude tool-use loop against a local fake Messages API (recorded SSE streams, no
network) and a real sandbox VM."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time

import anthropic
import pytest

from smol_kernel.claude_agent import (
    MAX_CACHE_BREAKPOINTS,
    TOOL_NAME,
    Usage,
    move_cache_breakpoint,
    run_agent,
)
from smol_kernel.sandbox import AsyncSandbox

from .conftest import runtime_entries
from .fake_messages_api import FakeMessagesAPI
from .kernel_helpers import tiny_png

pytestmark = pytest.mark.vm
RECORDED = ["turn1_tool_use.sse", "turn2_end_turn.sse"]


def sent_key(headers: dict) -> str | None:
    """The API key as the SDK sent it (``x-api-key``, or a bearer token in SDK 2)."""
    bearer = headers.get("authorization", "")
    return headers.get("x-api-key") or (bearer[7:] if bearer.startswith("Bearer ") else None)


@pytest.fixture(scope="module")
async def sandbox():
    async with AsyncSandbox(pool_size=0) as sb:
        yield sb


async def test_tool_runs_before_the_message_ends_and_images_go_back(sandbox):
    seen: dict[str, bool] = {}

    def before_event(name: str, n: int) -> None:
        # Hold the first message just before its end: the tool must already be running.
        if n == 0 and name == "message_delta":
            deadline = time.monotonic() + 60
            while not sandbox.busy and time.monotonic() < deadline:
                time.sleep(0.05)
            seen["busy_before_message_stop"] = sandbox.busy

    with FakeMessagesAPI(RECORDED, before_event) as api:
        client = anthropic.AsyncAnthropic(base_url=api.base_url, api_key="test-key")
        text: list[str] = []
        result = await run_agent("Plot something.", sandbox, client, on_text=text.append)

    assert seen == {"busy_before_message_stop": True}, "dispatched only after message_stop"
    assert result.stop_reason == "end_turn" and result.turns == 2
    assert result.text == "The code ran; the chart is a single green pixel."
    assert "".join(text).startswith("I'll run some code.")
    (ex,) = result.executions
    assert ex.status == "ok" and "tool ran in" in ex.logs.stdout[0]

    first, second = api.requests
    assert first["stream"] is True and sent_key(api.headers[0]) == "test-key"
    assert first["system"][-1]["cache_control"] == {"type": "ephemeral"}
    (tool,) = first["tools"]
    assert tool["name"] == TOOL_NAME and tool["eager_input_streaming"] is True
    assert tool["cache_control"] == {"type": "ephemeral"}
    assistant, results = second["messages"][1:]
    assert [b["type"] for b in assistant["content"]] == ["text", "tool_use"]
    (tool_result,) = results["content"]
    assert tool_result["tool_use_id"] == "toolu_01" and not tool_result["is_error"]
    text_block, image_block = tool_result["content"]
    assert "tool ran in" in text_block["text"] and "[image 1: image/png" in text_block["text"]
    assert image_block["source"]["media_type"] == "image/png"
    assert base64.b64decode(image_block["source"]["data"]) == tiny_png()
    # The conversation so far is cached: the breakpoint sits on the last tool result block.
    assert tool_result["cache_control"] == {"type": "ephemeral"}
    assert count_breakpoints(second) <= MAX_CACHE_BREAKPOINTS
    # The usage the recorded responses report, per turn and in total.
    assert result.turn_usage == [Usage(812, 790, 0, 120), Usage(1020, 0, 790, 15)]
    assert result.usage == Usage(1832, 790, 790, 135)


def count_breakpoints(request: dict) -> int:
    found = 0

    def walk(node) -> None:
        nonlocal found
        if isinstance(node, dict):
            found += "cache_control" in node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({k: request[k] for k in ("system", "tools", "messages")})
    return found


def test_the_cache_breakpoint_moves_to_the_newest_tool_result():
    messages: list[dict] = [{"role": "user", "content": "task"}]
    for turn in range(5):
        results = [{"type": "tool_result", "tool_use_id": f"t{turn}{i}", "content": []}
                   for i in range(2)]  # fmt: skip
        move_cache_breakpoint(messages, results)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "x"}]})
        messages.append({"role": "user", "content": results})
    marked = [b["tool_use_id"] for m in messages if isinstance(m["content"], list)
              for b in m["content"] if "cache_control" in b]  # fmt: skip
    assert marked == ["t41"], "only the last block of the newest results"


async def test_turn_limit_stops_the_loop(sandbox):
    with FakeMessagesAPI(["turn1_tool_use.sse"]) as api:  # always asks for the tool
        client = anthropic.AsyncAnthropic(base_url=api.base_url, api_key="k")
        result = await run_agent("loop forever", sandbox, client, max_turns=2)
    assert result.stop_reason == "max_turns" and result.turns == 2
    assert len(api.requests) == 2 and len(result.executions) == 2


def test_agent_command_end_to_end(tmp_path):
    before = runtime_entries()
    with FakeMessagesAPI(RECORDED) as api:
        env = {**os.environ, "ANTHROPIC_API_KEY": "cli-key"}
        proc = subprocess.run(
            [sys.executable, "-m", "smol_kernel.cli", "agent", "Plot something.",
             "--base-url", api.base_url, "--pool-size", "0"],
            capture_output=True, text=True, env=env, timeout=400,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--- execute_python ---" in proc.stdout and "tool ran in" in proc.stdout
    assert proc.stdout.rstrip().endswith("the chart is a single green pixel.")
    assert "isolation tcg" in proc.stderr or "isolation kvm" in proc.stderr
    assert len(api.requests) == 2 and sent_key(api.headers[0]) == "cli-key"
    assert "[turn 1: input 812, cache write 790, cache read 0, output 120 tokens]" in proc.stderr
    assert ("[total over 2 turn(s): input 1832, cache write 790, cache read 790, output 135 "
            "tokens]") in proc.stderr  # fmt: skip
    assert runtime_entries() == before, "the agent's VM must be gone when it exits"


def test_agent_command_without_api_key_says_what_to_do():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC")}
    proc = subprocess.run(
        [sys.executable, "-m", "smol_kernel.cli", "agent", "x", "--pool-size", "0"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "ANTHROPIC_API_KEY" in proc.stderr
