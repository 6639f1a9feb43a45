"""DataExtentCache against a plain set-of-bytes model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cowbackup.block.extent_cache import DataExtentCache

SPAN = 200

ranges = st.tuples(st.integers(0, SPAN), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1]))
ops = st.lists(st.tuples(st.sampled_from(["add", "forget"]), ranges), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_never_claims_data_that_was_forgotten_or_never_added(
    operations: list[tuple[str, tuple[int, int]]],
) -> None:
    cache = DataExtentCache(capacity=4)
    data: set[int] = set()
    for op, (start, end) in operations:
        if op == "add":
            cache.add(start, end)
            data.update(range(start, end))
        else:
            cache.forget(start, end)
            data.difference_update(range(start, end))
        assert len(cache) <= 4
        starts, ends = cache._starts, cache._ends
        assert all(s < e for s, e in zip(starts, ends, strict=True))
        assert all(ends[i] < starts[i + 1] for i in range(len(starts) - 1))  # disjoint, not touching
        for offset in range(SPAN + 41):
            cached_end = cache.lookup(offset)
            if cached_end is not None:
                assert offset < cached_end
                assert set(range(offset, cached_end)) <= data


def test_unbounded_cache_remembers_everything() -> None:
    cache = DataExtentCache(capacity=1000)
    for i in range(0, 100, 10):
        cache.add(i, i + 5)
    assert cache.lookup(3) == 5
    assert cache.lookup(7) is None
    cache.add(5, 10)  # joins [0,5) and [10,15)
    assert cache.lookup(0) == 15
    cache.forget(2, 12)
    assert cache.lookup(1) == 2
    assert cache.lookup(2) is None
    assert cache.lookup(12) == 15


def test_capacity_drops_the_range_farthest_from_the_newest() -> None:
    cache = DataExtentCache(capacity=2)
    cache.add(0, 1)
    cache.add(10, 11)
    cache.add(20, 21)
    assert cache.lookup(0) is None
    assert cache.lookup(10) == 11
    assert cache.lookup(20) == 21
