"""``smol-kernel mcp``: an MCP server whose tools run Python and shell commands in microVMs.

Built on the official ``mcp`` SDK (v2, ``MCPServer``). Each named session is one
``AsyncSandbox`` (one VM, one kernel), created on first use and killed by ``close_session``
or when the server exits; the provisioner's parent-death signal takes the VMs down even if
the server is killed. Transports: stdio (default) or streamable HTTP (``--http HOST:PORT``),
which requires ``Authorization: Bearer TOKEN`` on every request to ``/mcp`` (the only
path it serves).

What the model sees is capped (``max_output_chars`` per call), and every PNG or JPEG a cell
displays comes back as an image content block. Long runs send progress notifications (with
the latest output line) every ``PROGRESS_INTERVAL`` seconds when the client asked for them.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import re
import time
from typing import Any

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ImageContent, TextContent, ToolAnnotations

from .sandbox import AsyncSandbox, Execution, SandboxError
from .settings import network_on

PROGRESS_INTERVAL = 2.0
SESSION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
INSTRUCTIONS = """\
Runs Python in an isolated microVM sandbox (a Jupyter kernel): variables persist between
run_python calls of a session; files written by code or write_file stay in that session's VM.
{network} No host files unless the operator shared them. Use a timeout for long code; a
timed-out call is interrupted and keeps its partial output. Sessions are independent VMs.
Before risky code, `checkpoint`; `rewind` restores that state; `fork` copies a session.
Need a package? `install_packages` (the host fetches it; pip in the VM has no network)."""


class Sessions:
    """Named sandboxes with the same settings; at most ``max_sessions`` at once."""

    def __init__(self, settings: dict[str, Any], max_sessions: int = 4):
        self.settings = settings
        self.max_sessions = max_sessions
        self._sandboxes: dict[str, AsyncSandbox] = {}
        self._starting: dict[str, asyncio.Future] = {}

    async def get(self, name: str, create: bool = True) -> AsyncSandbox:
        if not SESSION_NAME.fullmatch(name):
            raise ValueError("a session name is 1-64 letters, digits, '_', '.' or '-'")
        if name in self._sandboxes:
            return self._sandboxes[name]
        if not create:
            raise ValueError(f"no session named {name!r}; list_sessions shows them")
        if name not in self._starting:
            if len(self._sandboxes) + len(self._starting) >= self.max_sessions:
                raise ValueError(
                    f"{self.max_sessions} sessions are open (the server's --max-sessions); "
                    "close_session one first"
                )
            self._starting[name] = asyncio.ensure_future(AsyncSandbox.create(**self.settings))
        fut = self._starting[name]
        try:
            sandbox = await asyncio.shield(fut)
        finally:
            if fut.done():
                self._starting.pop(name, None)
        self._sandboxes[name] = sandbox
        return sandbox

    def names(self) -> list[str]:
        return sorted(self._sandboxes)

    async def fork(self, name: str, new_names: list[str], checkpoint: str | None) -> None:
        """Open sessions ``new_names``, forks of session ``name`` (as it is now, or at one of
        its checkpoints)."""
        for new in new_names:
            if not SESSION_NAME.fullmatch(new):
                raise ValueError("a session name is 1-64 letters, digits, '_', '.' or '-'")
            if new in self._sandboxes or new in self._starting:
                raise ValueError(f"session {new!r} is open already; pick other names")
        if len(set(new_names)) != len(new_names):
            raise ValueError("the fork names repeat")
        if len(self._sandboxes) + len(self._starting) + len(new_names) > self.max_sessions:
            raise ValueError(
                f"{len(new_names)} more session(s) would pass the server's --max-sessions "
                f"({self.max_sessions}); close_session some first"
            )
        source = await self.get(name, create=False)
        loop = asyncio.get_running_loop()
        for new in new_names:  # taken while the forks start (counted, not reusable)
            self._starting[new] = loop.create_future()
        try:
            forks = await source.fork(len(new_names), checkpoint)
        finally:
            for new in new_names:  # a call that waited on one: the fork is done now
                placeholder = self._starting.pop(new)
                placeholder.set_exception(ValueError(f"session {new!r} was being forked; "
                                                     "call again"))  # fmt: skip
                placeholder.exception()  # (retrieved: nobody may have waited)
        self._sandboxes.update(zip(new_names, forks, strict=True))

    async def close(self, name: str) -> bool:
        sandbox = self._sandboxes.pop(name, None)
        if sandbox is None:
            return False
        await sandbox.kill()
        return True

    async def close_all(self) -> None:
        # Starting sandboxes are awaited, not cancelled: a boot cut short could leave a VM.
        for fut in list(self._starting.values()):
            try:
                sandbox = await fut
            except BaseException:
                continue
            await sandbox.kill()
        self._starting.clear()
        await asyncio.gather(*(self.close(n) for n in self.names()), return_exceptions=True)


def execution_content(ex: Execution) -> list[TextContent | ImageContent]:
    """An Execution as MCP content: its text report, then one image block per image."""
    images = [ImageContent(type="image", data=data, mime_type=mime) for mime, data in ex.images()]
    return [TextContent(type="text", text=ex.report()), *images]


def _says_why(fn):
    """Failures a caller can act on (a missing file, a full session table, a VM that did
    not start) reach the model with their message; the SDK hides other exceptions."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (OSError, ValueError, SandboxError) as e:
            raise ToolError(str(e)) from e

    return wrapper


def network_sentence(network: bool, allow_hosts: list[str] | tuple[str, ...] = ()) -> str:
    if allow_hosts:
        return ("The sandbox can reach only these destinations (others are refused at once): "
                + ", ".join(allow_hosts) + ".")  # fmt: skip
    return "The sandbox has network access." if network else "No network access."


def build_server(
    sessions: Sessions, network: bool = False, allow_hosts: list[str] | tuple[str, ...] = (),
    http: tuple[str, int] | None = None, token: str | None = None,
) -> MCPServer:  # fmt: skip
    """The server and its tools; with ``http``, every request to ``/mcp`` needs ``token``."""
    auth = {}
    if http is not None:
        # A resource server with no authorization server: the issuer is never advertised
        # (no resource_server_url, so no metadata routes); it is only required by the SDK,
        # so it names no real host (an IPv6 address would not even parse as one).
        settings = AuthSettings(issuer_url="http://localhost", resource_server_url=None)
        auth = {"token_verifier": StaticToken(token or ""), "auth": settings}
    server = MCPServer(
        name="smol-kernel",
        instructions=INSTRUCTIONS.format(network=network_sentence(network, allow_hosts)),
        **auth,
    )
    network = network_on(network, allow_hosts)
    confined = ToolAnnotations(destructive_hint=False, open_world_hint=network)
    reading = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(annotations=confined)
    @_says_why
    async def run_python(
        code: str, ctx: Context, timeout: float = 60, session: str = "default"
    ) -> CallToolResult:
        """Run Python code in the session's sandbox kernel (IPython: the last expression is
        shown, `!cmd` and `%magics` work). Returns stdout, stderr, results, errors and
        images. State persists between calls of a session."""
        sandbox = await sessions.get(session)
        last_line = [""]
        t0 = time.monotonic()

        def on_output(text: str) -> None:
            if lines := text.strip().splitlines():
                last_line[0] = lines[-1][:200]

        async def report() -> None:
            while True:
                await asyncio.sleep(PROGRESS_INTERVAL)
                elapsed = time.monotonic() - t0
                msg = f"running for {elapsed:.0f}s" + (f": {last_line[0]}" if last_line[0] else "")
                await ctx.report_progress(min(elapsed, timeout), timeout, msg)

        ticker = asyncio.ensure_future(report())
        try:
            ex = await sandbox.run_code(code, timeout=timeout, on_stdout=on_output,
                                        on_stderr=on_output)  # fmt: skip
        finally:
            ticker.cancel()
        return CallToolResult(content=execution_content(ex), is_error=ex.status != "ok")

    @server.tool(annotations=confined)
    @_says_why
    async def run_shell(command: str, timeout: float = 60, session: str = "default") -> str:
        """Run a shell command (/bin/sh -c) in the session's sandbox VM, beside the kernel.
        Returns the exit code, stdout and stderr."""
        r = await (await sessions.get(session)).commands.run(command, timeout=timeout)
        parts = [f"exit code {r.exit_code}" + (" (timed out, killed)" if r.timed_out else "")]
        if r.stdout:
            parts.append(r.stdout.rstrip("\n"))
        if r.stderr:
            parts.append("[stderr]\n" + r.stderr.rstrip("\n"))
        if r.truncated:
            parts.append("[output truncated]")
        return "\n".join(parts)

    @server.tool(annotations=confined)
    @_says_why
    async def interrupt(session: str = "default") -> str:
        """Interrupt the code running in a session (KeyboardInterrupt); variables are kept."""
        await (await sessions.get(session, create=False)).interrupt()
        return f"interrupted session {session!r}"

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    @_says_why
    async def restart(session: str = "default") -> str:
        """Restart a session: a fresh kernel in a fresh VM (variables and files are gone)."""
        sandbox = await sessions.get(session, create=False)
        if sandbox.busy:
            await sandbox.interrupt()
        await sandbox.restart()
        return f"session {session!r} restarted: fresh kernel, empty files"

    @server.tool(annotations=reading)
    @_says_why
    async def read_file(path: str, session: str = "default", encoding: str = "text") -> str:
        """Read a file from the session's VM: encoding 'text' (UTF-8) or 'base64'."""
        sandbox = await sessions.get(session)
        if encoding == "base64":
            return base64.b64encode(await sandbox.files.read(path, format="bytes")).decode()
        return await sandbox.files.read(path)

    @server.tool(annotations=confined)
    @_says_why
    async def write_file(
        path: str, content: str, session: str = "default", encoding: str = "text"
    ) -> str:
        """Write a file in the session's VM (parent folders are created): content is
        text, or base64 with encoding='base64'."""
        data = base64.b64decode(content, validate=True) if encoding == "base64" else content
        size = await (await sessions.get(session)).files.write(path, data)
        return f"wrote {size} bytes to {path}"

    @server.tool(annotations=reading)
    @_says_why
    async def list_files(path: str = ".", session: str = "default") -> str:
        """List a folder in the session's VM (relative paths start at the kernel's folder)."""
        entries = await (await sessions.get(session)).files.list(path)
        lines = [f"{e.type:<8}{e.size:>12}  {e.name}" for e in entries]
        return "\n".join(lines) if lines else f"{path} is empty"

    # The host reaches the index for it, whatever the session's own network.
    @server.tool(annotations=ToolAnnotations(destructive_hint=False, open_world_hint=True))
    @_says_why
    async def install_packages(requirements: list[str], session: str = "default") -> str:
        """Install Python packages into the session (names with optional versions, e.g.
        ["pandas>=2", "pyarrow"]): the host fetches binary wheels from the server's index
        and unpacks them in the VM, which keeps no network; then import them in run_python.
        Says what was installed, or why not (unknown package, no wheel, a cap)."""
        sandbox = await sessions.get(session)
        return (await sandbox.install(list(requirements))).text

    @server.tool(annotations=confined)
    @_says_why
    async def checkpoint(name: str = "", session: str = "default") -> str:
        """Save the session as it is now (variables, imports, files, processes) under
        `name` (cp1, cp2, ... if empty). Take one before risky code; `rewind` comes back."""
        sandbox = await sessions.get(session, create=False)
        cp = await sandbox.checkpoint(name or None)
        size = f"{cp.size_bytes / (1 << 20):.0f} MiB"
        return f"checkpoint {cp.name} of session {session!r} saved ({size}); rewind comes back"

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    @_says_why
    async def rewind(name: str, session: str = "default") -> str:
        """Bring the session back to one of its checkpoints: variables, files and processes
        as they were then; everything since is gone."""
        sandbox = await sessions.get(session, create=False)
        await sandbox.rewind(name)
        saved = ", ".join(c.name for c in await sandbox.checkpoints())
        return f"session {session!r} rewound to checkpoint {name} (checkpoints: {saved})"

    @server.tool(annotations=confined)
    @_says_why
    async def fork(names: list[str], session: str = "default", checkpoint: str = "") -> str:
        """Open new sessions `names`, each a copy of `session` as it is now (or at its
        checkpoint `checkpoint`), in its own VM: try alternatives side by side. Each goes
        its own way after the fork; close_session them when done."""
        if not names:
            raise ValueError("give the new sessions' names")
        await sessions.fork(session, list(names), checkpoint or None)
        return f"forked session {session!r} into: {', '.join(names)}"

    @server.tool(annotations=reading)
    @_says_why
    async def list_sessions() -> str:
        """The open sessions, with the isolation each VM got (kvm/hvf: hardware; tcg:
        emulation)."""
        lines = []
        for name in sessions.names():
            sandbox = await sessions.get(name, create=False)
            state = "busy" if sandbox.busy else "idle"
            lines.append(f"{name}: {state}, isolation {sandbox.isolation}, "
                         f"kernel {sandbox.kernel_id}")  # fmt: skip
        return "\n".join(lines) if lines else "no sessions (run_python opens 'default')"

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    @_says_why
    async def close_session(session: str = "default") -> str:
        """Close a session: its VM, variables and files are destroyed."""
        if not await sessions.close(session):
            raise ValueError(f"no session named {session!r}")
        return f"session {session!r} closed"

    return server


class StaticToken:
    """The SDK's ``TokenVerifier`` for the one bearer token ``--token`` sets (or that was
    generated and printed): compared in constant time, no expiry, no scopes."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the HTTP transport needs a bearer token")
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        # Starlette decoded the header as latin-1: encoding it back gives the bytes sent
        # (a UTF-8 token arrives as its UTF-8 bytes).
        try:
            sent = token.encode("latin-1")
        except UnicodeEncodeError:
            return None
        if not hmac.compare_digest(sent, self._token):
            return None
        return AccessToken(token=token, client_id="smol-kernel-token", scopes=[])


async def serve(
    config: dict[str, Any],
    env: dict[str, str] | None = None,
    max_output_chars: int = 20_000,
    max_sessions: int = 4,
    http: tuple[str, int] | None = None,
    token: str | None = None,
) -> None:
    """Run the server until its transport ends (stdin closed, or the HTTP server stops);
    every session's VM is killed on the way out. ``config``: provisioner settings."""
    from .sandbox import fill_sandbox_pool

    sessions = Sessions({**config, "env": env, "max_output_chars": max_output_chars},
                        max_sessions)  # fmt: skip
    server = build_server(sessions, network=bool(config.get("network")),
                          allow_hosts=config.get("allow_hosts") or (), http=http,
                          token=token)  # fmt: skip
    await fill_sandbox_pool(env, **config)  # the first session starts warm (pool_size 0: nothing)
    try:
        if http is None:
            await server.run_stdio_async()
        else:
            import uvicorn

            host, port = http
            app = server.streamable_http_app(host=host)
            config = uvicorn.Config(app, host=host, port=port, log_level="warning")
            await uvicorn.Server(config).serve()
    finally:
        await sessions.close_all()
