"""``smol-kernel agent "TASK"``: Claude solves a task by running Python in a smolvm sandbox.

A plain tool-use loop on the ``anthropic`` SDK's streaming Messages API, with one tool,
``execute_python``:

* the tool streams its input eagerly (``eager_input_streaming``), and each tool call is sent
  to the sandbox as soon as its content block stops, while the rest of the message is still
  streaming; results go back in the order of the calls;
* the system prompt and the tool carry ``cache_control``, and so does the last block of the
  latest tool results (the breakpoint moves with it: at most ``MAX_CACHE_BREAKPOINTS`` in a
  request), so each turn reads the whole conversation so far from the prompt cache;
* the usage each response reports (input, cache writes, cache reads, output tokens) is kept
  per turn and in total in ``AgentResult`` and printed on stderr by the command;
* a ``tool_result`` holds the execution's text report and one image block per PNG/JPEG;
* at most ``max_turns`` model calls.

The sandbox is what makes it safe to run what the model wrote: no network unless
``network=True``, no host files unless shared.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .sandbox import AsyncSandbox, Execution

DEFAULT_MODEL = "claude-sonnet-4-5"
MAX_CACHE_BREAKPOINTS = 4  # the Messages API's limit per request
EPHEMERAL = {"type": "ephemeral"}
SYSTEM_PROMPT = """\
You solve the user's task by writing Python and running it with the execute_python tool.
The code runs in a Jupyter (IPython) kernel inside an isolated microVM: variables persist
between calls; the last expression of a cell is shown; matplotlib figures shown with
plt.show() come back to you as images. The sandbox has {network}. Keep each call short
(it is interrupted after its timeout). When the task is done, answer in plain words."""
TOOL_NAME = "execute_python"
TOOL = {
    "name": TOOL_NAME,
    "description": "Run Python code in the sandbox's Jupyter kernel and return its stdout, "
    "stderr, results, errors and images.",
    "input_schema": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "description": "Python code (IPython syntax)."},
            "timeout": {
                "type": "number",
                "description": "Seconds before it is interrupted (default 60).",
            },
        },
        "required": ["code"],
    },
    "eager_input_streaming": True,
    "cache_control": dict(EPHEMERAL),  # caches the tools (and the system before them)
}


@dataclass
class Usage:
    """Tokens of one response, as the API reports them (or their sum over turns)."""

    input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def of(cls, reported: Any) -> Usage:
        def count(name: str) -> int:
            value = getattr(reported, name, None)
            return value if isinstance(value, int) and value >= 0 else 0

        return cls(*(count(f) for f in ("input_tokens", "cache_creation_input_tokens",
                                        "cache_read_input_tokens", "output_tokens")))  # fmt: skip

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens,
                     self.cache_creation_input_tokens + other.cache_creation_input_tokens,
                     self.cache_read_input_tokens + other.cache_read_input_tokens,
                     self.output_tokens + other.output_tokens)  # fmt: skip

    def describe(self) -> str:
        return (f"input {self.input_tokens}, cache write {self.cache_creation_input_tokens}, "
                f"cache read {self.cache_read_input_tokens}, output {self.output_tokens} "
                "tokens")  # fmt: skip


@dataclass
class AgentResult:
    text: str  # the model's last words
    turns: int
    stop_reason: str | None  # "end_turn", ... or "max_turns" when the limit cut it short
    executions: list[Execution] = field(default_factory=list)
    turn_usage: list[Usage] = field(default_factory=list)

    @property
    def usage(self) -> Usage:
        """All turns' usage added up."""
        return sum(self.turn_usage, Usage())


def system_blocks(network: bool) -> list[dict]:
    prompt = SYSTEM_PROMPT.format(network="network access" if network else "no network access")
    return [{"type": "text", "text": prompt, "cache_control": dict(EPHEMERAL)}]


def tool_result(tool_use_id: str, ex: Execution | None, problem: str = "") -> dict:
    if ex is None:
        return {"type": "tool_result", "tool_use_id": tool_use_id, "is_error": True,
                "content": [{"type": "text", "text": problem}]}  # fmt: skip
    content: list[dict] = [{"type": "text", "text": ex.report()}]
    for mime, data in ex.images():
        source = {"type": "base64", "media_type": mime, "data": data}
        content.append({"type": "image", "source": source})
    return {"type": "tool_result", "tool_use_id": tool_use_id, "content": content,
            "is_error": ex.status != "ok"}  # fmt: skip


async def run_agent(
    task: str,
    sandbox: AsyncSandbox,
    client: Any,  # anthropic.AsyncAnthropic
    model: str = DEFAULT_MODEL,
    max_turns: int = 10,
    max_tokens: int = 4096,
    network: bool = False,
    on_text: Callable[[str], Any] | None = None,
    on_tool: Callable[[str, Execution | None], Any] | None = None,
    on_usage: Callable[[int, Usage], Any] | None = None,
) -> AgentResult:
    """Run the loop until the model stops asking for tools or ``max_turns`` calls were
    made. ``on_text`` gets the model's text as it streams; ``on_tool(code, None)`` fires
    when a call is dispatched and ``on_tool(code, execution)`` when it finished;
    ``on_usage(turn, usage)`` after each response."""
    messages: list[dict] = [{"role": "user", "content": task}]
    result = AgentResult(text="", turns=0, stop_reason=None)
    system = system_blocks(network)
    for _ in range(max_turns):
        result.turns += 1
        calls: list[tuple[str, asyncio.Future | None, str]] = []  # (id, run, problem)
        async with client.messages.stream(
            model=model, max_tokens=max_tokens, system=system, tools=[TOOL], messages=messages
        ) as stream:
            async for event in stream:
                if event.type == "text" and on_text:
                    on_text(event.text)
                elif event.type == "content_block_stop" and event.content_block.type == "tool_use":
                    calls.append(_dispatch(event.content_block, sandbox, on_tool))
            message = await stream.get_final_message()
        result.turn_usage.append(Usage.of(message.usage))
        if on_usage:
            on_usage(result.turns, result.turn_usage[-1])
        blocks = [b.model_dump(exclude_none=True) for b in message.content]
        messages.append({"role": "assistant", "content": blocks})
        result.stop_reason = message.stop_reason
        result.text = "".join(b.text for b in message.content if b.type == "text")
        if not calls:
            return result
        results = []
        for tool_use_id, run, problem in calls:
            ex = await run if run is not None else None
            if ex is not None:
                result.executions.append(ex)
            results.append(tool_result(tool_use_id, ex, problem))
        move_cache_breakpoint(messages, results)
        messages.append({"role": "user", "content": results})
    result.stop_reason = "max_turns"
    return result


def move_cache_breakpoint(messages: list[dict], newest: list[dict]) -> None:
    """Mark the last block of ``newest`` (the tool results about to be sent) for caching
    and unmark earlier ones: the system and the tool hold two breakpoints, this the third,
    so a request never has more than ``MAX_CACHE_BREAKPOINTS``."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict):
                    block.pop("cache_control", None)
    if newest:
        newest[-1]["cache_control"] = dict(EPHEMERAL)


def _dispatch(block: Any, sandbox: AsyncSandbox, on_tool) -> tuple[str, Any, str]:
    """Start a tool call now (the message may still be streaming)."""
    args = block.input if isinstance(block.input, dict) else {}
    code = args.get("code")
    if block.name != TOOL_NAME or not isinstance(code, str):
        return block.id, None, f"unknown tool {block.name!r} or no 'code' string in its input"
    try:
        timeout = float(args.get("timeout", 60))
    except (TypeError, ValueError):
        timeout = 60.0
    if on_tool:
        on_tool(code, None)

    async def run() -> Execution:
        ex = await sandbox.run_code(code, timeout=min(max(timeout, 1.0), 600.0))
        if on_tool:
            on_tool(code, ex)
        return ex

    return block.id, asyncio.ensure_future(run()), ""


def run_agent_cli(args: argparse.Namespace, config: dict, env: dict[str, str]) -> int:
    import os

    import anthropic

    if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
        raise ValueError("set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) for the Messages API")
    client = anthropic.AsyncAnthropic(**({"base_url": args.base_url} if args.base_url else {}))

    from .shown import printable

    # The model's text and code, and the sandbox's output: no control characters on the
    # terminal (a cell, or a prompt injected into the model, could print escape sequences).
    def show_text(text: str) -> None:
        sys.stdout.write(printable(text))
        sys.stdout.flush()

    def show_tool(code: str, ex: Execution | None) -> None:
        if ex is None:
            text = f"\n--- execute_python ---\n{code}\n---\n"
        else:
            text = f"[{ex.status}, {ex.duration_s:.1f}s]\n{ex.report()}\n---\n"
        sys.stdout.write(printable(text))
        sys.stdout.flush()

    def show_usage(turn: int, usage: Usage) -> None:
        print(f"[turn {turn}: {usage.describe()}]", file=sys.stderr, flush=True)

    async def main() -> AgentResult:
        async with AsyncSandbox(env=env, max_output_chars=args.max_output_chars,
                                **config) as sandbox:  # fmt: skip
            print(f"[sandbox ready: isolation {sandbox.isolation}]", file=sys.stderr, flush=True)
            return await run_agent(
                args.task, sandbox, client, model=args.model or DEFAULT_MODEL,
                max_turns=args.max_turns, max_tokens=args.max_tokens,
                network=bool(config.get("network")),
                on_text=show_text, on_tool=show_tool, on_usage=show_usage,
            )  # fmt: skip

    try:
        result = asyncio.run(main())
    except anthropic.APIError as e:
        print(f"smol-kernel agent: the Messages API failed: {e}", file=sys.stderr)
        return 1
    print()
    print(f"[total over {result.turns} turn(s): {result.usage.describe()}]", file=sys.stderr)
    if result.stop_reason == "max_turns":
        print(f"smol-kernel agent: stopped after {result.turns} turns (--max-turns)",
              file=sys.stderr)  # fmt: skip
        return 3
    return 0
