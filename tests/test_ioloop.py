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

        with pytest.raises(RuntimeError, match="own thread would never return"):
            lt.call(_call_from_inside(lt))
    finally:
        lt.stop()
    assert not lt.running and lt.loop.is_closed()
    sandbox_like = LoopThread("test-loop-2", reentry="not from a callback")
    try:
        with pytest.raises(RuntimeError, match="not from a callback"):
            sandbox_like.call(_call_from_inside(sandbox_like))
    finally:
        sandbox_like.stop()


async def _call_from_inside(lt: LoopThread) -> None:
    """A blocking call on ``lt`` made from its own thread."""
    coro = _where()
    try:
        lt.call(coro)
    finally:
        coro.close()


async def test_on_io_loop_from_another_loop_and_from_itself():
    assert await on_io_loop(_where()) == "smol-kernel-io"

    async def inner():
        return await on_io_loop(_where())  # already on the io loop: awaited in place

    assert await on_io_loop(inner()) == "smol-kernel-io"
    assert io_loop() is io_loop()
