"""Timings of DirtyBitmap on a 16 TiB disk at 64 KiB granularity.

Run: PYTHONPATH=src python bench/bitmap_bench.py
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

from cowbackup.block.bitmap import DirtyBitmap

KiB = 1024
MiB = 1024 * KiB
TiB = 1024 * 1024 * MiB
SIZE = 16 * TiB
GRANULARITY = 64 * KiB


def timeit(label: str, fn: Callable[[], object], repeat: int) -> None:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    per_call = (time.perf_counter() - start) / repeat
    print(f"{label:<52} {per_call * 1e6:12.1f} us")


def main() -> None:
    tracemalloc.start()
    bitmap = DirtyBitmap(SIZE, GRANULARITY)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{'memory of a clean 16 TiB / 64 KiB bitmap':<52} {current / MiB:12.1f} MiB")

    # Nearly clean: one dirty MiB near the end.
    bitmap.set(SIZE - 3 * MiB, MiB)
    timeit(
        "next_dirty_area(0, size, 1 GiB), nearly clean",
        lambda: bitmap.next_dirty_area(0, SIZE, 1 << 30),
        2000,
    )
    timeit("next_dirty(0), nearly clean", lambda: bitmap.next_dirty(0), 2000)
    timeit("count()", bitmap.count, 100000)
    timeit("count_range(0, size), nearly clean", lambda: bitmap.count_range(0, SIZE), 200)

    # Each set dirties 16 clean granules and the following reset cleans them again,
    # so every call really changes bits and walks the towers.
    offsets = [(i * 7919 * MiB) % (SIZE - MiB) for i in range(5000)]

    def set_then_reset() -> None:
        for offset in offsets:
            bitmap.set(offset, MiB)
            bitmap.reset(offset, MiB)

    start = time.perf_counter()
    set_then_reset()
    per_op = (time.perf_counter() - start) / (2 * len(offsets))
    print(f"{'set or reset of 1 MiB at a random aligned offset':<52} {per_op * 1e6:12.1f} us")

    timeit("set_all()", bitmap.set_all, 5)
    timeit(
        "next_dirty_area(0, size, 1 GiB), all dirty", lambda: bitmap.next_dirty_area(0, SIZE, 1 << 30), 2000
    )
    timeit("dirty_areas() of an all-dirty bitmap", lambda: list(bitmap.dirty_areas()), 2000)
    timeit("count_range(0, size), all dirty", lambda: bitmap.count_range(0, SIZE), 5)
    other = DirtyBitmap(SIZE, GRANULARITY)
    timeit("merge() of an all-dirty bitmap", lambda: other.merge(bitmap), 2)
    data = bitmap.serialize()
    timeit(
        "deserialize() of an all-dirty bitmap", lambda: DirtyBitmap.deserialize(SIZE, GRANULARITY, data), 2
    )
    timeit("clear()", bitmap.clear, 5)


if __name__ == "__main__":
    main()
