"""start_eager: a coroutine runs at once, and the task that carries it on behaves like its own task."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from cowbackup.eager import start_eager


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run the coroutine test function in a fresh event loop."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(asyncio.wait_for(test(), 10))

    return run


@in_loop
async def test_finishes_in_the_callers_stack() -> None:
    steps: list[str] = []

    async def quick() -> None:
        steps.append("ran")

    assert start_eager(quick()) is None
    assert steps == ["ran"]


@in_loop
async def test_exception_before_the_first_wait_propagates() -> None:
    async def bad() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        start_eager(bad())


@in_loop
async def test_runs_until_the_first_wait_then_a_task_carries_on() -> None:
    steps: list[str] = []
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits() -> int:
        steps.append("before")
        value = await fut
        steps.append(f"after {value}")
        await asyncio.sleep(0)  # a bare yield
        return value * 2

    task = start_eager(waits())
    assert task is not None
    assert steps == ["before"]
    fut.set_result(21)
    assert await task == 42
    assert steps == ["before", "after 21"]


@in_loop
async def test_a_futures_exception_reaches_the_coroutine() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    caught: list[BaseException] = []

    async def waits() -> str:
        try:
            await fut
        except RuntimeError as err:  # even RuntimeError is the future's, not the driver's
            caught.append(err)
        return "handled"

    task = start_eager(waits())
    assert task is not None
    fut.set_exception(RuntimeError("from the future"))
    assert await task == "handled"
    assert str(caught[0]) == "from the future"


@in_loop
async def test_executor_futures_work() -> None:
    async def blocking() -> int:
        return await asyncio.get_running_loop().run_in_executor(None, sum, [1, 2, 3])

    task = start_eager(blocking())
    assert task is not None
    assert await task == 6


@in_loop
async def test_cancel_cancels_the_awaited_future() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def waits() -> None:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = start_eager(waits())
    assert task is not None
    await asyncio.sleep(0)  # the task is now waiting on fut
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fut.cancelled()
    assert seen == ["cancelled"]


@in_loop
async def test_cancel_that_comes_after_the_future_finished_still_reaches_the_coroutine() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def waits() -> str:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            return "swallowed"
        return "not cancelled"

    task = start_eager(waits())
    assert task is not None
    await asyncio.sleep(0)
    fut.set_result(None)  # done, but the task has not run since
    task.cancel()
    assert await task == "swallowed"
    assert seen == ["cancelled"]


@in_loop
async def test_a_coroutine_may_catch_the_cancel_and_go_on() -> None:
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    second: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits() -> int:
        with contextlib.suppress(asyncio.CancelledError):
            await first
        return await second

    task = start_eager(waits())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    second.set_result(7)
    assert await task == 7
