"""``Sandbox``: the blocking face of ``AsyncSandbox``, for scripts and threaded tools.

Each Sandbox runs its AsyncSandbox on a private event loop in a daemon thread; every method
blocks on it. Methods may be called from any thread (``interrupt()`` from one thread stops a
``run_code`` blocking another). Callbacks run on the sandbox's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .async_sandbox import AsyncSandbox, CommandResult, EntryInfo, SandboxError
from .execution import Execution, ExecutionError, Result

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="smol-sandbox",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise SandboxError("this sandbox was killed; create a new one")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a Sandbox method cannot be called from one of its callbacks")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


class Sandbox:
    """A Python sandbox in a microVM, started on creation::

        with Sandbox() as sb:
            print(sb.run_code("1 + 1").text)

    Takes the same arguments as ``AsyncSandbox`` (provisioner settings and limits)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._loop = _Loop()
        try:
            self._async = self._loop.run(_create(args, kwargs))
        except BaseException:
            self._loop.stop()
            raise
        self.files = Files(self._async.files, self._loop)
        self.commands = Commands(self._async.commands, self._loop)

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

    def is_running(self) -> bool:
        if self._loop.loop.is_closed():
            return False
        return self._loop.run(self._async.is_running())

    def kill(self) -> None:
        """Destroy the VM. Idempotent."""
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._async.kill())
        finally:
            self._loop.stop()


async def _create(args: tuple, kwargs: dict) -> AsyncSandbox:
    return await AsyncSandbox.create(*args, **kwargs)


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
