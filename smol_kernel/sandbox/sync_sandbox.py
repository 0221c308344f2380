"""``Sandbox``: the blocking face of ``AsyncSandbox``, for scripts and threaded tools.

Each Sandbox runs its AsyncSandbox on a private event loop in a daemon thread; every method
blocks on it. Methods may be called from any thread (``interrupt()`` from one thread stops a
``run_code`` blocking another). Callbacks run on the sandbox's thread.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..checkpoint import Checkpoint
from ..ioloop import LoopThread
from ..packages.installer import InstallReport
from .async_sandbox import AsyncSandbox, CommandResult, EntryInfo, SandboxError, SandboxOptions
from .execution import Execution, ExecutionError, Result

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # Python 3.10
    from typing_extensions import Unpack

T = TypeVar("T")


class _Loop:
    """One loop thread, shared by a sandbox and its forks: it stops with its last user."""

    def __init__(self) -> None:
        self.users = 1
        self.thread = LoopThread(
            "smol-sandbox", reentry="a Sandbox method cannot be called from one of its callbacks"
        )

    @property
    def closed(self) -> bool:
        return not self.thread.running

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.closed:
            coro.close()
            raise SandboxError("this sandbox was killed; create a new one")
        return self.thread.call(coro)

    def stop(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.thread.stop()


class Sandbox:
    """A Python sandbox in a microVM, started on creation::

        with Sandbox() as sb:
            print(sb.run_code("1 + 1").text)

    Takes the same arguments as ``AsyncSandbox`` (``SandboxOptions``: provisioner settings
    and limits)."""

    def __init__(self, **options: Unpack[SandboxOptions]):
        self._loop = _Loop()
        self._done = False
        try:
            self._async = self._loop.run(_create(dict(options)))
        except BaseException:
            self._loop.stop()
            raise
        self.files = Files(self._async.files, self._loop)
        self.commands = Commands(self._async.commands, self._loop)

    @classmethod
    def _on(cls, sandbox: AsyncSandbox, loop: _Loop) -> Sandbox:
        """A blocking face for ``sandbox``, which runs on ``loop`` (a fork's parent's)."""
        self = cls.__new__(cls)
        loop.users += 1
        self._loop, self._async, self._done = loop, sandbox, False
        self.files = Files(sandbox.files, loop)
        self.commands = Commands(sandbox.commands, loop)
        return self

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def isolation(self) -> str | None:
        return self._async.isolation

    @property
    def kernel_id(self) -> str | None:
        return self._async.kernel_id

    @property
    def provisioner(self) -> Any:
        """See ``AsyncSandbox.provisioner`` (its attributes belong to the sandbox's loop)."""
        return self._async.provisioner

    def run_code(
        self,
        code: str,
        timeout: float = 60,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[Result], Any] | None = None,
        on_error: Callable[[ExecutionError], Any] | None = None,
    ) -> Execution:
        return self._loop.run(
            self._async.run_code(code, timeout, on_stdout, on_stderr, on_result, on_error)
        )

    def interrupt(self) -> None:
        self._loop.run(self._async.interrupt())

    def restart(self) -> None:
        self._loop.run(self._async.restart())

    def checkpoint(self, name: str | None = None, keep: bool = False) -> Checkpoint:
        """See ``AsyncSandbox.checkpoint``."""
        return self._loop.run(self._async.checkpoint(name, keep))

    def install(self, requirements: Sequence[str]) -> InstallReport:
        """See ``AsyncSandbox.install``."""
        return self._loop.run(self._async.install(requirements))

    def rewind(self, checkpoint: Checkpoint | str) -> None:
        """See ``AsyncSandbox.rewind``."""
        self._loop.run(self._async.rewind(checkpoint))

    def checkpoints(self) -> list[Checkpoint]:
        return self._loop.run(self._async.checkpoints())

    def fork(self, n: int = 1, checkpoint: Checkpoint | str | None = None) -> list[Sandbox]:
        """See ``AsyncSandbox.fork``; the forks share this sandbox's loop thread."""
        forks = self._loop.run(self._async.fork(n, checkpoint))
        return [Sandbox._on(f, self._loop) for f in forks]

    def is_running(self) -> bool:
        if self._done or self._loop.closed:
            return False
        return self._loop.run(self._async.is_running())

    def kill(self) -> None:
        """Destroy the VM. Idempotent."""
        if self._done or self._loop.closed:
            return
        self._done = True
        try:
            self._loop.run(self._async.kill())
        finally:
            self._loop.stop()


async def _create(options: dict[str, Any]) -> AsyncSandbox:
    return await AsyncSandbox.create(**options)


class _Blocking:
    """Blocking versions of an async helper's coroutine methods."""

    def __init__(self, target: Any, loop: _Loop):
        self._target, self._loop = target, loop

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._loop.run(getattr(self._target, name)(*args, **kwargs))


class Files(_Blocking):
    """See ``AsyncFiles``."""

    def write(self, path: str, data: str | bytes) -> int:
        return self._call("write", path, data)

    def read(self, path: str, format: str = "text") -> str | bytes:
        return self._call("read", path, format)

    def list(self, path: str = ".") -> list[EntryInfo]:
        return self._call("list", path)

    def remove(self, path: str) -> None:
        self._call("remove", path)


class Commands(_Blocking):
    """See ``AsyncCommands``."""

    def run(
        self, cmd: str, timeout: float = 60, cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> CommandResult:  # fmt: skip
        return self._call("run", cmd, timeout, cwd, env)
