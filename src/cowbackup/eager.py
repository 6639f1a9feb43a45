"""Start a coroutine at once, in the caller's stack, and make it a task only if it has to wait.

Python 3.12 calls this an *eager task*; 3.11 has no such thing, and a task costs a turn of the event loop
before its first line runs.  An NBD request served from the page cache never waits: run eagerly, its reply
leaves in the same callback that received the request::

    data_received -> parse -> start_eager(serve(req)) -> pread -> writev      (one turn, no task)
                                          \\-> first await that really waits -> Task carries it on

The task that carries a suspended coroutine on behaves as if it had run it from the start: it waits for
the future the coroutine is waiting on, a ``cancel()`` cancels that future (so the coroutine sees
CancelledError at its ``await``), and the coroutine's result or exception is the task's.

Caveat: until it first waits, the coroutine runs outside any task, so ``asyncio.current_task()`` is the
caller's (None in a protocol callback) and ``asyncio.timeout()`` must not be its first await.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["carry_on", "start_eager"]

T = TypeVar("T")


def start_eager(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
    """Run ``coro`` until it finishes (return None) or first waits (return the Task that carries it on).

    An exception ``coro`` raises before it first waits propagates to the caller; its result, when it
    finishes at once, is dropped (use it for coroutines that deliver their outcome themselves).
    """
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(carry_on(coro, waiting_on))


async def carry_on(coro: Coroutine[Any, Any, T], waiting_on: Any) -> T:
    """Drive ``coro`` (suspended on ``waiting_on``) to its end, as the task running it would.

    For a caller that started ``coro`` itself (``waiting_on = coro.send(None)``) and found it waiting:
    awaited in a task, this carries it on as :func:`start_eager`'s task does.
    """
    while True:
        to_throw: BaseException | None = None
        if waiting_on is None:  # a bare yield (asyncio.sleep(0)): let the loop run once
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                to_throw = asyncio.CancelledError()
        elif asyncio.isfuture(waiting_on):
            # The coroutine's await marked the future as being waited on; a task clears the mark when it
            # takes the future over, and so must we before awaiting it again here.
            waiting_on._asyncio_future_blocking = False
            try:
                await waiting_on  # cancelling this task cancels the future, as for the original task
            except asyncio.CancelledError:
                # The future's own cancellation reaches the coroutine when it reads the result; a
                # cancel of this task that came too late to cancel the future is passed in by hand.
                if not waiting_on.cancelled():
                    to_throw = asyncio.CancelledError()
            except BaseException:  # the coroutine reads the future's exception itself
                pass
        else:
            to_throw = RuntimeError(f"coroutine yielded {waiting_on!r}, not a future")
        try:
            waiting_on = coro.send(None) if to_throw is None else coro.throw(to_throw)
        except StopIteration as stop:
            result: T = stop.value
            return result
