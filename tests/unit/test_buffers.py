"""The buffer free lists: reuse by size class, the cap on what is kept, the pool's budget."""

from __future__ import annotations

import asyncio

from cowbackup.block.buffers import BufferCache, BufferPool

KiB = 1024


def test_cache_reuses_a_freed_buffer_of_the_same_class() -> None:
    cache = BufferCache(max_kept=1024 * KiB)
    first = cache.take(100 * KiB)
    assert len(first) == 100 * KiB
    owner = first.obj
    cache.give(first)
    assert cache.kept == 128 * KiB
    again = cache.take(120 * KiB)  # same 128 KiB class
    assert again.obj is owner and len(again) == 120 * KiB
    assert cache.kept == 0
    other = cache.take(200 * KiB)  # another class: a new buffer
    assert other.obj is not owner


def test_cache_keeps_no_more_than_its_cap() -> None:
    cache = BufferCache(max_kept=256 * KiB)
    views = [cache.take(128 * KiB) for _ in range(3)]
    owners = [view.obj for view in views]
    for view in views:
        cache.give(view)
    assert cache.kept == 256 * KiB  # the third was dropped
    kept = {id(owner) for owner in owners[:2]}
    again = [cache.take(128 * KiB) for _ in range(3)]
    assert {id(view.obj) for view in again[:2]} == kept and id(again[2].obj) not in kept
    cache.clear()
    assert cache.kept == 0


def test_pool_waits_for_its_budget() -> None:
    async def body() -> None:
        pool = BufferPool(budget=128 * KiB)
        first = await pool.get(128 * KiB)
        waiter = asyncio.ensure_future(pool.get(64 * KiB))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        pool.put(first)
        second = await asyncio.wait_for(waiter, 1)
        assert len(second) == 64 * KiB and pool.used == 64 * KiB
        huge = asyncio.ensure_future(pool.get(1024 * KiB))  # over budget: passes once alone
        pool.put(second)
        assert len(await asyncio.wait_for(huge, 1)) == 1024 * KiB

    asyncio.run(body())


def test_pool_drop_frees_the_budget_but_not_the_buffer() -> None:
    async def body() -> None:
        pool = BufferPool(budget=128 * KiB)
        first = await pool.get(128 * KiB)
        owner = first.obj
        pool.drop(first)  # something may still use it: never handed out again
        assert pool.used == 0
        again = await asyncio.wait_for(pool.get(128 * KiB), 1)
        assert again.obj is not owner

    asyncio.run(body())
