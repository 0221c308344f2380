"""``smol-kernel mcp|agent``: microVM sandboxes for AI assistants."""

from __future__ import annotations

import argparse
import sys

from .provisioner_flags import _env_flags, _provisioner_config


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--http {text!r}: use HOST:PORT, e.g. 127.0.0.1:8765")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_mcp(args: argparse.Namespace) -> int:
    try:
        from ..mcp_server import serve
    except ImportError as e:
        raise ValueError(f"{e}; install the MCP extra: pip install 'smol-kernel[mcp]'") from None
    import asyncio
    import secrets

    config = _provisioner_config(args)
    http = _host_port(args.http) if args.http else None
    token = args.token
    if http is not None and not token:
        token = secrets.token_urlsafe(32)
        print(f"smol-kernel mcp: bearer token (send 'Authorization: Bearer TOKEN'): {token}",
              file=sys.stderr, flush=True)  # fmt: skip
    if http is not None:
        print(f"smol-kernel mcp: streamable HTTP on http://{http[0]}:{http[1]}/mcp",
              file=sys.stderr, flush=True)  # fmt: skip
    asyncio.run(serve(config, _env_flags(args), args.max_output_chars, args.max_sessions,
                      http, token))  # fmt: skip
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    try:
        from ..claude_agent import run_agent_cli
    except ImportError as e:
        raise ValueError(
            f"{e}; install the agent extra: pip install 'smol-kernel[agent]'"
        ) from None
    return run_agent_cli(args, _provisioner_config(args), _env_flags(args))
