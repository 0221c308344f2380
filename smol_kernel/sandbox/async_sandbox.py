"""``AsyncSandbox``: a smolvm kernel (one microVM) driven as a code-execution tool.

It is a real Jupyter kernel under a real ``jupyter_client`` manager, started by the same
``SmolVMProvisioner`` with the same settings and defaults as the "Python (smolvm)"
kernelspec, so it shares that provisioner's warm pool (``pool_size``). Files and commands go
through the guest agent, beside the kernel: they work while a cell runs.

Contract of ``run_code``: it returns within ``timeout`` plus a few seconds, whatever the code
does. At the timeout the kernel is interrupted and the partial output kept; a kernel that
ignores the interrupt for ``interrupt_grace`` seconds, or that died, is replaced by a fresh
kernel in a fresh VM (in the background; the next call waits for it). A sandbox is one VM
at a time: a replacement starts with empty files, like any kernel restart here.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jupyter_client.kernelspec import KernelSpec

from .. import checkpoint as checkpoint_store
from .. import kernelspec
from ..agent_client import AgentError
from ..checkpoint import Checkpoint, CheckpointError
from ..egress.log import LOG_INTERVAL as EGRESS_LOG_INTERVAL
from ..guest import protocol as P
from ..packages.installer import InstallError, InstallReport
from ..packages.requirements import RequirementError
from ..provisioner import SmolVMProvisioner
from ..settings import KernelOptions, check_network, default_of
from ..shown import escaped
from ..vm.base import VmError
from ..vm.network import describe_destination
from .execution import Execution, ExecutionError, OutputCollector, Result
from .session import KernelSession, SandboxError

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # Python 3.10
    from typing_extensions import Unpack

MAX_FILE_BYTES = 100 * 1024 * 1024
MAX_FORKS = 16
# What a fork copies of its parent (the rest is its own kernel and connection).
_SETTINGS = ("_config", "_spec", "max_output_chars", "max_file_bytes", "interrupt_grace",
             "startup_timeout")  # fmt: skip


@dataclass
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int  # negative: killed by that signal (-9 after a timeout)
    timed_out: bool = False
    truncated: bool = False  # more than protocol.COMMAND_OUTPUT_CAP bytes of a stream


@dataclass
class EntryInfo:
    name: str
    path: str
    type: str  # file, dir, symlink or other (symlinks are not followed)
    size: int
    mtime: float


class SandboxOptions(KernelOptions, total=False):
    """What a sandbox takes (``Sandbox(**options)``, ``AsyncSandbox.create``): the kernel's
    settings, its environment, and the bounds of what a call returns."""

    env: dict[str, str] | None
    max_output_chars: int
    max_file_bytes: int
    interrupt_grace: float


def _valid_name(name: str) -> bool:
    """A single path component: not empty, ``.`` or ``..``; no ``/``, NUL or control."""
    if name in ("", ".", "..") or "/" in name:
        return False
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name)


def provisioner_settings(**settings: Any) -> dict[str, Any]:
    """Validate sandbox settings against the provisioner's traits (None = its default)."""
    from ..provisioner import SmolVMProvisioner

    traits = SmolVMProvisioner.class_traits(config=True)
    unknown = sorted(set(settings) - set(traits))
    if unknown:
        raise TypeError(
            f"unknown sandbox setting(s) {', '.join(unknown)}; known: {', '.join(sorted(traits))}"
        )
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()
              if v is not None}  # fmt: skip
    SmolVMProvisioner(**config)  # a bad value raises TraitError naming the setting
    check_network(config.get("allow_hosts", ()), config.get("private_answer_ranges", ()),
                  config.get("dns_servers", ()))  # fmt: skip
    return config


def kernel_spec(env: dict[str, str] | None, config: dict[str, Any]) -> KernelSpec:
    """The installed kernelspec's template, with the sandbox's settings."""
    spec = kernelspec.template()
    spec["metadata"]["kernel_provisioner"]["config"] = config
    return KernelSpec(
        argv=spec["argv"],
        display_name="Python (smolvm sandbox)",
        language=spec["language"],
        interrupt_mode=spec["interrupt_mode"],
        env=dict(env or {}),
        metadata=spec["metadata"],
    )


async def fill_sandbox_pool(env: dict[str, str] | None = None, **settings: Any) -> str:
    """Start filling the warm pool for sandboxes with these settings (``pool_size`` VMs),
    so the first one starts warm; returns what it did."""
    from ..server_extension import warm_kernelspec

    return await warm_kernelspec(kernel_spec(env, provisioner_settings(**settings)))


class AsyncSandbox:
    """A Python sandbox in a microVM: ``async with AsyncSandbox() as sb: await
    sb.run_code("1+1")``. Its settings are the provisioner's (``KernelOptions``:
    ``image``, ``network``, ``shares``, ``allow_hosts``, ``vcpus``, ``memory_mib``,
    ``startup_timeout``, ``pool_size``, ...), keyword arguments with the provisioner's
    defaults; ``env`` is the kernel's environment, and the rest bound what a call returns."""

    def __init__(
        self,
        *,
        env: dict[str, str] | None = None,
        max_output_chars: int = 100_000,
        max_file_bytes: int = MAX_FILE_BYTES,
        interrupt_grace: float = 3.0,
        **settings: Unpack[KernelOptions],
    ):
        self._config = provisioner_settings(**settings)
        self._spec = kernel_spec(env, self._config)
        self.max_output_chars = max_output_chars
        self.max_file_bytes = max_file_bytes
        self.interrupt_grace = interrupt_grace
        # The provisioner's boot deadline and the wait for kernel_info: one value.
        self.startup_timeout = float(self._config.get("startup_timeout",
                                                      default_of("startup_timeout")))  # fmt: skip
        self._fresh()

    def _fresh(self) -> None:
        """The state of a sandbox not started yet (a new one, or a fork)."""
        self.files = AsyncFiles(self)
        self.commands = AsyncCommands(self)
        self._session = KernelSession(self._spec, self.startup_timeout)
        self._run_lock = asyncio.Lock()
        self._interrupt_requested = False

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def create(cls, **options: Unpack[SandboxOptions]) -> AsyncSandbox:
        sandbox = cls(**options)
        await sandbox.start()
        return sandbox

    async def __aenter__(self) -> AsyncSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    async def start(self, *, restore_from: Checkpoint | None = None) -> None:
        """Boot the VM and wait until its kernel answers. Raises SandboxError (with the
        provisioner's reason) if it cannot; nothing is left running then. ``restore_from``:
        start as a fork of that checkpoint (``fork`` does this)."""
        await self._session.start(restore_from)

    @property
    def provisioner(self) -> SmolVMProvisioner | None:
        """The kernel's provisioner (its VM, isolation, egress log), for tools that need
        more than this API; None before the start and after ``kill``."""
        return self._session.provisioner

    @property
    def isolation(self) -> str | None:
        """``kvm``, ``hvf`` or ``tcg`` (emulation: not a security boundary)."""
        return getattr(self.provisioner, "isolation", None)

    @property
    def kernel_id(self) -> str | None:
        return self._session.km.kernel_id if self._session.km else None

    @property
    def busy(self) -> bool:
        """A ``run_code`` is in progress."""
        return self._run_lock.locked()

    async def is_running(self) -> bool:
        return await self._session.is_running()

    async def kill(self) -> None:
        """Stop the kernel and destroy its VM at once. Idempotent; the sandbox is done."""
        await self._session.kill()

    async def restart(self) -> None:
        """A fresh kernel in a fresh VM (waits for a running ``run_code`` to return:
        ``interrupt()`` first to cut it short)."""
        async with self._run_lock:
            await self._session.ready()
            await self._session.replace()

    async def interrupt(self) -> None:
        """SIGINT the kernel (a running ``run_code`` then returns ``interrupted``)."""
        await self._session.ready()
        self._interrupt_requested = True
        assert self._session.km is not None
        await self._session.km.interrupt_kernel()

    # ------------------------------------------------------------------ checkpoints
    async def checkpoint(self, name: str | None = None, keep: bool = False) -> Checkpoint:
        """Save the sandbox as it is now (variables, files, processes) under ``name``
        (``cp1``, ``cp2``, ... by default); waits for a running ``run_code``. ``keep``: the
        checkpoint outlives the sandbox. Raises SandboxError with the reason it cannot."""
        async with self._run_lock:
            await self._session.ready()
            try:
                return await self._prov().checkpoint(name, keep)
            except (CheckpointError, VmError) as e:
                raise SandboxError(str(e)) from None

    async def install(self, requirements: Sequence[str]) -> InstallReport:
        """Install packages into the sandbox (``["pandas>=2", "pyarrow"]``): the host
        resolves and fetches binary wheels from the server's index and unpacks them in the
        VM, which keeps no network (docs/packages.md). Returns what was installed (with
        dependencies); raises SandboxError with the reason (a refused requirement, an
        unknown package, no wheel for the guest, a cap). Waits for a running ``run_code``."""
        if isinstance(requirements, str):
            requirements = [requirements]
        async with self._run_lock:
            await self._session.ready()
            try:
                return await self._prov().install_packages(list(requirements))
            except (RequirementError, InstallError, VmError, AgentError, TimeoutError) as e:
                raise SandboxError(str(e) or type(e).__name__) from None

    async def rewind(self, checkpoint: Checkpoint | str) -> None:
        """Bring the sandbox back to one of its checkpoints (by object or name): same
        kernel, its state and files as they were. Waits for a running ``run_code``."""
        name = checkpoint.name if isinstance(checkpoint, Checkpoint) else str(checkpoint)
        async with self._run_lock:
            await self._session.ready()
            try:
                await self._prov().rewind(name)
            except (CheckpointError, VmError) as e:
                raise SandboxError(str(e)) from None

    async def checkpoints(self) -> list[Checkpoint]:
        """This sandbox's checkpoints, oldest first."""
        await self._session.ready()
        return await self._prov().checkpoints()

    async def fork(self, n: int = 1, checkpoint: Checkpoint | str | None = None
                   ) -> list[AsyncSandbox]:  # fmt: skip
        """``n`` new sandboxes, each its own VM, that start from this one as it is now (or
        from one of its checkpoints) and then go their own ways: fresh entropy, their own
        files. Kill them as any sandbox. All or nothing: if one cannot start, none is left."""
        if not 1 <= n <= MAX_FORKS:
            raise ValueError(f"n must be 1 to {MAX_FORKS}")
        name = checkpoint.name if isinstance(checkpoint, Checkpoint) else checkpoint
        async with self._run_lock:
            await self._session.ready()
            prov = self._prov()
            try:
                source, temporary = await prov.fork_source(name)
            except (CheckpointError, VmError) as e:
                raise SandboxError(str(e)) from None
        forks = [self._twin() for _ in range(n)]
        try:
            results = await asyncio.gather(*(f.start(restore_from=source) for f in forks),
                                           return_exceptions=True)  # fmt: skip
        finally:
            if temporary:
                checkpoint_store.remove(source)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(f.kill() for f in forks), return_exceptions=True)
            raise SandboxError(f"the fork did not start: {failed[0]}") from failed[0]
        return forks

    def _twin(self) -> AsyncSandbox:
        """A sandbox with this one's settings (not started)."""
        twin = AsyncSandbox.__new__(AsyncSandbox)
        twin.__dict__.update({k: v for k, v in self.__dict__.items() if k in _SETTINGS})
        twin._fresh()
        return twin

    def _prov(self) -> SmolVMProvisioner:
        """The provisioner of a started sandbox (after ``self._session.ready()``)."""
        prov = self._session.provisioner
        assert prov is not None
        return prov

    # ------------------------------------------------------------------ code
    async def run_code(
        self,
        code: str,
        timeout: float = 60,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[Result], Any] | None = None,
        on_error: Callable[[ExecutionError], Any] | None = None,
    ) -> Execution:
        """Run ``code`` in the kernel; see the module docstring for the timeout contract.
        Callbacks run in order of the output, with what the Execution keeps."""
        async with self._run_lock:
            await self._session.ready()
            collector = OutputCollector(
                self.max_output_chars, on_stdout, on_stderr, on_result, on_error
            )
            ex = collector.execution
            t0 = time.monotonic()
            self._interrupt_requested = False
            session = self._session
            blocked_before = await self._blocked()
            msg_id = session.kc.execute(code, allow_stdin=False, stop_on_error=False)
            state = await session.pump(msg_id, collector, t0 + timeout)
            if state == "timeout":
                assert session.km is not None
                await session.km.interrupt_kernel()
                state = await session.pump(msg_id, collector,
                                           time.monotonic() + self.interrupt_grace)  # fmt: skip
                ex.status = "timeout"
                if state == "timeout":  # the code ignores SIGINT
                    ex.kernel_restarted = True
                    session.replace_soon()
            elif state == "idle":
                reply = await session.reply(msg_id)
                ex.execution_count = reply.get("execution_count")
                if reply.get("status") == "error" or ex.error is not None:
                    by_us = ex.error is not None and ex.error.name == "KeyboardInterrupt"
                    ex.status = "interrupted" if by_us and self._interrupt_requested else "error"
            if state == "died":
                ex.status = "kernel_died"
                session.replace_soon()
            ex.duration_s = time.monotonic() - t0
            blocked_after = await self._blocked(settled=True)
            ex.blocked = [dest for dest, n in blocked_after.items()
                          if n > blocked_before.get(dest, 0)]  # fmt: skip
            return ex

    async def _blocked(self, settled: bool = False) -> dict[str, int]:
        """Blocked destinations in the kernel VM's egress log, with their counts.
        ``settled``: if the guard wrote the log less than its interval ago (a refusal it
        saw since may not be written yet), wait for its next write first."""
        prov = self._session.provisioner
        log = prov.egress_log() if prov is not None else None
        age = time.time() - float((log or {}).get("written", 0))
        if settled and prov is not None and log is not None and 0 <= age < EGRESS_LOG_INTERVAL:
            await asyncio.sleep(EGRESS_LOG_INTERVAL - age + 0.05)
            log = prov.egress_log()
        entries = (log or {}).get("entries", [])
        return {describe_destination(e): int(e.get("count", 0))
                for e in entries if e.get("verdict") == "blocked"}  # fmt: skip

    # ------------------------------------------------------------------ agent
    async def _agent(self, op: str, timeout: float = 30.0, **fields: Any) -> dict:
        await self._session.ready()
        try:
            return await self._prov().guest_request(op, timeout, **fields)
        except AgentError as e:
            if e.errno:
                raise OSError(e.errno, f"{os.strerror(e.errno)} (in the sandbox)",
                              fields.get("path")) from None  # fmt: skip
            raise SandboxError(str(e)) from None
        except VmError as e:
            raise SandboxError(f"the sandbox's VM is not running: {e}") from None


class AsyncFiles:
    """The sandbox's files, through the guest agent. Relative paths start at the kernel's
    working folder. Every path is the guest's: ``..`` and symlinks cannot reach the host."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sb = sandbox

    async def write(self, path: str, data: str | bytes) -> int:
        """Create or replace ``path`` (parent folders are created); returns its size."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if len(raw) > self._sb.max_file_bytes:
            raise ValueError(
                f"{len(raw)} bytes is more than files.write takes ({self._sb.max_file_bytes}, "
                "the sandbox's max_file_bytes)"
            )
        size = 0
        for offset in range(0, max(len(raw), 1), P.FILE_CHUNK):
            chunk = base64.b64encode(raw[offset : offset + P.FILE_CHUNK]).decode()
            reply = await self._sb._agent(P.OP_WRITE_FILE, path=path, data=chunk,
                                          append=offset > 0)  # fmt: skip
            size = int(reply.get("size", 0))
        return size

    async def read(self, path: str, format: str = "text") -> str | bytes:
        """The file's content: ``text`` (UTF-8) or ``bytes``."""
        if format not in ("text", "bytes"):
            raise ValueError("format must be 'text' or 'bytes'")
        cap = self._sb.max_file_bytes
        data = bytearray()
        while True:
            reply = await self._sb._agent(P.OP_READ_FILE, path=path, offset=len(data),
                                          length=P.FILE_CHUNK)  # fmt: skip
            size = int(reply.get("size", 0))
            chunk = base64.b64decode(str(reply.get("data", "")), validate=True)
            if max(size, len(data) + len(chunk)) > cap:
                raise ValueError(
                    f"{path} is {size} bytes, more than files.read returns ({cap}, the "
                    "sandbox's max_file_bytes); read it in code or raise the cap"
                )
            data += chunk
            if not chunk or len(data) >= size:
                break
        if format == "bytes":
            return bytes(data)
        try:
            return data.decode()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text; use format='bytes'") from e

    async def list(self, path: str = ".") -> list[EntryInfo]:
        """The folder's entries. Names are the guest's: one that no file system could hold
        (empty, ``.``/``..``, with ``/``, NUL or control characters) is refused with
        SandboxError rather than passed on to code that would join it to a path."""
        reply = await self._sb._agent(P.OP_LIST_FILES, path=path)
        base = path.rstrip("/") or "/"
        prefix = "" if base == "/" else base
        entries = reply.get("entries", [])
        out = []
        for e in entries if isinstance(entries, list) else []:
            try:
                name, kind = e["name"], str(e["type"])
                size, mtime = int(e["size"]), float(e["mtime"])
            except (KeyError, TypeError, ValueError):
                raise SandboxError("the sandbox's file listing is malformed") from None
            if not isinstance(name, str) or not _valid_name(name):
                raise SandboxError(
                    f"the sandbox listed a file name no file system holds: "
                    f'"{escaped(name)}" (in {escaped(path)}); the guest is misbehaving'
                )
            out.append(EntryInfo(name, f"{prefix}/{name}", kind, size, mtime))
        return out

    async def remove(self, path: str) -> None:
        """Remove a file, a symlink (not its target) or a folder with its content."""
        await self._sb._agent(P.OP_REMOVE_FILE, path=path)


class AsyncCommands:
    """Shell commands run by the guest agent (``/bin/sh -c``), beside the kernel, with the
    kernel's environment, working folder and process cap."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sb = sandbox

    async def run(
        self,
        cmd: str,
        timeout: float = 60,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> CommandResult:
        reply = await self._sb._agent(
            P.OP_RUN_COMMAND, timeout + 15, command=cmd, cwd=cwd or ".", env=env or {},
            time_limit=timeout,
        )  # fmt: skip
        return CommandResult(
            stdout=base64.b64decode(str(reply.get("stdout", ""))).decode(errors="replace"),
            stderr=base64.b64decode(str(reply.get("stderr", ""))).decode(errors="replace"),
            exit_code=int(reply.get("exit_code", -1)),
            timed_out=bool(reply.get("timed_out")),
            truncated=bool(reply.get("truncated")),
        )
