"""Event loops that turn in threads of their own: the process's io loop, and one per
blocking ``Sandbox``.

jupyter_client's synchronous KernelManager runs provisioner coroutines on a loop that only
turns while one of its calls is in progress; a relay living on that loop would stall as
soon as the call returns. So relays, agent connections and VM handles live on the io loop,
and provisioner methods hop onto it (``on_io_loop``).

``LoopThread`` is the one way we run a loop in a thread. Its thread is a daemon, unlike
the worker of anyio's blocking portal: a script that forgets to close a Sandbox must still
exit (its VMs are closed by ``exit_hooks``), and a portal's worker is joined before any
exit hook runs, so the script would hang.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a daemon thread named ``name`` until ``stop()``;
    ``reentry`` is the error a blocking call from that thread gets."""

    def __init__(
        self, name: str, reentry: str = "a blocking call on a loop's own thread would never return"
    ) -> None:
        self.reentry = reentry
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()
        ready.wait()

    @property
    def running(self) -> bool:
        return not self.loop.is_closed() and self._thread.is_alive()

    def in_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop; block this (other) thread until it is done."""
        if self.in_thread():
            coro.close()
            raise RuntimeError(self.reentry)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def call_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and await its result from any loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:  # (a RuntimeError from coro itself must propagate)
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, and close it once its thread has ended."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


_io: LoopThread | None = None
_lock = threading.Lock()


def io_loop() -> asyncio.AbstractEventLoop:
    """The process's io loop (started on first use, never stopped)."""
    global _io
    with _lock:
        if _io is None:
            _io = LoopThread("smol-kernel-io")
    return _io.loop


async def on_io_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the io loop and await its result from any loop."""
    io_loop()
    assert _io is not None
    return await _io.call_async(coro)
