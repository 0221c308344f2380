"""One background asyncio loop for everything that must keep running between calls.

jupyter_client's synchronous KernelManager runs provisioner coroutines on a loop that only
turns while one of its calls is in progress; a relay living on that loop would stall as
soon as the call returns. So relays, agent connections and VM handles live on this
dedicated loop (a daemon thread), and provisioner methods hop onto it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def io_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=run, name="smol-kernel-io", daemon=True).start()
            ready.wait()
            _loop = loop
    return _loop


async def on_io_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the io loop and await its result from any loop."""
    loop = io_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:  # (a RuntimeError from coro itself must propagate, not retry it)
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
