"""LoopThread, the one way a loop runs in a thread (the io loop, each blocking Sandbox)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from smol_kernel.ioloop import LoopThread, io_loop, on_io_loop


async def _where() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


def test_calls_run_on_the_loop_thread_and_errors_come_back():
    lt = LoopThread("test-loop")
    try:
        assert lt._thread.daemon, "a forgotten loop must not hold the interpreter open"
        assert lt.call(_where()) == "test-loop"

        async def fail():
            raise ValueError("from the loop")

        with pytest.raises(ValueError, match="from the loop"):
            lt.call(fail())

        async def nested():
            coro = _where()
            try:
                lt.call(coro)
            finally:
                coro.close()

        with pytest.raises(RuntimeError, match="own thread would never return"):
            lt.call(nested())
    finally:
        lt.stop()
    assert not lt.running and lt.loop.is_closed()


async def test_on_io_loop_from_another_loop_and_from_itself():
    assert await on_io_loop(_where()) == "smol-kernel-io"

    async def inner():
        return await on_io_loop(_where())  # already on the io loop: awaited in place

    assert await on_io_loop(inner()) == "smol-kernel-io"
    assert io_loop() is io_loop()
