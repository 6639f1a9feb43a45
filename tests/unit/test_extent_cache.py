"""ExtentCache against a plain byte -> value model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cowbackup.block.extent_cache import ExtentCache

SPAN = 200

ranges = st.tuples(st.integers(0, SPAN), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1]))
ops = st.lists(st.tuples(st.sampled_from(["add", "forget"]), ranges, st.integers(0, 2)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(1, 6))
def test_never_claims_what_was_forgotten_replaced_or_never_added(
    operations: list[tuple[str, tuple[int, int], int]], capacity: int
) -> None:
    cache: ExtentCache[int] = ExtentCache(capacity=capacity)
    model: dict[int, int] = {}
    for op, (start, end), value in operations:
        if op == "add":
            cache.add(start, end, value)
            model.update(dict.fromkeys(range(start, end), value))
        else:
            cache.forget(start, end)
            for i in range(start, end):
                model.pop(i, None)
        assert len(cache) <= capacity
        starts, ends, values = cache._starts, cache._ends, cache._values
        assert all(s < e for s, e in zip(starts, ends, strict=True))
        assert all(ends[i] <= starts[i + 1] for i in range(len(starts) - 1))  # sorted, disjoint
        assert all(  # touching neighbours with equal values are merged
            ends[i] < starts[i + 1] or values[i] != values[i + 1] for i in range(len(starts) - 1)
        )
        for offset in range(SPAN + 41):
            found = cache.lookup(offset)
            if found is not None:
                cached_end, cached_value = found
                assert offset < cached_end
                assert all(model.get(i) == cached_value for i in range(offset, cached_end))


def test_the_newest_answer_is_always_kept() -> None:
    cache: ExtentCache[str] = ExtentCache(capacity=1000)
    for i in range(0, 100, 10):
        cache.add(i, i + 5, "data")
    assert cache.lookup(3) == (5, "data")
    assert cache.lookup(7) is None
    cache.add(5, 10, "data")  # joins [0,5) and [10,15)
    assert cache.lookup(0) == (15, "data")
    cache.add(2, 12, "zero")
    assert cache.lookup(1) == (2, "data")
    assert cache.lookup(2) == (12, "zero")
    assert cache.lookup(12) == (15, "data")
    cache.forget(0, 13)
    assert cache.lookup(11) is None
    assert cache.lookup(13) == (15, "data")


def test_capacity_drops_the_range_farthest_from_the_newest() -> None:
    cache: ExtentCache[bool] = ExtentCache(capacity=2)
    cache.add(0, 1, True)
    cache.add(10, 11, True)
    cache.add(20, 21, True)
    assert cache.lookup(0) is None
    assert cache.lookup(10) == (11, True)
    assert cache.lookup(20) == (21, True)
