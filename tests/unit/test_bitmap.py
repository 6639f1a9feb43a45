"""Tests for cowbackup.block.bitmap: a plain-set model, edge cases, and a 16 TiB bitmap."""

from __future__ import annotations

import bisect
import tracemalloc
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowbackup.block.bitmap import DirtyBitmap

KiB = 1024
MiB = 1024 * KiB
TiB = 1024 * 1024 * MiB

# -- the model -------------------------------------------------------------------


class Model:
    """The reference: a set of dirty granule indices and nothing clever."""

    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.g = granularity
        self.dirty: set[int] = set()

    @property
    def bits(self) -> int:
        return -(-self.size // self.g)

    def set(self, offset: int, length: int) -> None:
        if length:
            self.dirty.update(range(offset // self.g, -(-(offset + length) // self.g)))

    def reset(self, first: int, end: int) -> None:
        self.dirty.difference_update(range(first, end))

    def resize(self, size: int) -> None:
        self.size = size
        self.dirty = {i for i in self.dirty if i < self.bits}

    def runs(self) -> list[tuple[int, int]]:
        """Maximal runs of dirty granules as [first, end) pairs."""
        runs: list[list[int]] = []
        for i in sorted(self.dirty):
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        return [(a, b) for a, b in runs]


class Expect:
    """Expected answers in byte units, derived from the model's runs."""

    def __init__(self, model: Model) -> None:
        self.m = model
        self.runs = model.runs()
        self.ends = [b for _, b in self.runs]

    def _stop(self, end: int | None) -> int:
        return self.m.size if end is None else min(end, self.m.size)

    def next_dirty(self, offset: int, end: int | None = None) -> int | None:
        stop, g = self._stop(end), self.m.g
        if offset >= stop:
            return None
        gi = offset // g
        k = bisect.bisect_right(self.ends, gi)
        if k == len(self.runs):
            return None
        found = max(offset, max(gi, self.runs[k][0]) * g)
        return found if found < stop else None

    def next_clean(self, offset: int, end: int | None = None) -> int | None:
        stop, g = self._stop(end), self.m.g
        if offset >= stop:
            return None
        gi = offset // g
        k = bisect.bisect_right(self.ends, gi)
        if k < len(self.runs) and self.runs[k][0] <= gi:
            gi = self.runs[k][1]
        found = max(offset, gi * g)
        return found if gi < self.m.bits and found < stop else None

    def dirty_areas(self, offset: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        stop, g = self._stop(end), self.m.g
        areas = []
        for a, b in self.runs:
            start, stop_run = max(a * g, offset), min(b * g, stop)
            if start < stop_run:
                areas.append((start, stop_run - start))
        return areas

    def next_dirty_area(self, offset: int, end: int, max_length: int) -> tuple[int, int] | None:
        areas = self.dirty_areas(offset, end)
        return (areas[0][0], min(areas[0][1], max_length)) if areas else None

    def count_range(self, offset: int, length: int) -> int:
        if not length:
            return 0
        first, end = offset // self.m.g, -(-(offset + length) // self.m.g)
        return sum(1 for i in self.m.dirty if first <= i < end) * self.m.g

    def serialize(self) -> bytes:
        data = bytearray(-(-self.m.bits // 8))
        for i in self.m.dirty:
            data[i // 8] |= 1 << (i % 8)
        return bytes(data)


def check_towers(bitmap: DirtyBitmap) -> None:
    """White-box check: recompute every summary level naively and compare."""
    level = [bitmap._l0[w] for w in range(len(bitmap._l0))]
    assert sum(w.bit_count() for w in level) == bitmap.count_bits()
    for kind, tower in (("any", bitmap._any), ("full", bitmap._full)):
        below = level
        for stored in tower:
            want = [(w != 0) if kind == "any" else (w == (1 << 64) - 1) for w in below]
            got = [bool(stored[i >> 6] >> (i & 63) & 1) for i in range(len(below))]
            assert got == want, kind
            pad = [bool(stored[i >> 6] >> (i & 63) & 1) for i in range(len(below), 64 * len(stored))]
            assert all(pad) if kind == "full" else not any(pad)
            below = list(stored)


def check_against(bitmap: DirtyBitmap, model: Model, probes: Iterable[int], full: bool) -> None:
    exp = Expect(model)
    size, g = model.size, model.g
    assert bitmap.size == size
    assert bitmap.count_bits() == len(model.dirty)
    assert bitmap.count() == len(model.dirty) * g
    assert bitmap.is_empty() == (not model.dirty)
    # Probe near the given offsets and near the first few run boundaries.
    points = {0, size}
    for a, b in exp.runs[:6] + exp.runs[-2:]:
        points.update((a * g, b * g))
    points.update(probes)
    points = {p + d for p in points for d in (-1, 0, 1) if 0 <= p + d <= size}
    for p in sorted(points):
        if p < size:
            assert bitmap.get(p) == ((p // g) in model.dirty), p
        assert bitmap.next_dirty(p) == exp.next_dirty(p), p
        assert bitmap.next_clean(p) == exp.next_clean(p), p
        end = min(size, p + 3 * g + 1)
        assert bitmap.next_dirty(p, end) == exp.next_dirty(p, end), (p, end)
        assert bitmap.next_clean(p, end) == exp.next_clean(p, end), (p, end)
        for max_length in (1, g, 5 * g + 3, size + 1):
            assert bitmap.next_dirty_area(p, size, max_length) == exp.next_dirty_area(p, size, max_length)
        assert bitmap.next_dirty_area(p, end, 2 * g) == exp.next_dirty_area(p, end, 2 * g)
        for stop in (end, size):
            assert bitmap.count_range(p, stop - p) == exp.count_range(p, stop - p), (p, stop)
            touched = exp.count_range(p, stop - p) if stop > p else 0
            span = (-(-stop // g) - p // g) * g if stop > p else 0
            assert bitmap.all_clean(p, stop) == (touched == 0), (p, stop)
            assert bitmap.all_dirty(p, stop) == (touched == span), (p, stop)
    if full:
        assert list(bitmap.dirty_areas()) == exp.dirty_areas()
        data = bitmap.serialize()
        assert data == exp.serialize()
        assert DirtyBitmap.deserialize(size, g, data) == bitmap
        check_towers(bitmap)


# -- strategies ------------------------------------------------------------------

GRANULARITIES = st.sampled_from([1, 2, 4, 8, 64, 512, 64 * KiB])


@st.composite
def geometries(draw: st.DrawFn, bits: st.SearchStrategy[int]) -> tuple[int, int]:
    """(size, granularity), the size often not a multiple of the granularity."""
    g = draw(GRANULARITIES)
    n = draw(bits)
    return (0 if n == 0 else (n - 1) * g + draw(st.integers(1, g))), g


def draw_range(data: st.DataObject, size: int, g: int) -> tuple[int, int]:
    offset = data.draw(st.integers(0, size), label="offset")
    room = size - offset
    length = data.draw(st.one_of(st.integers(0, min(room, 3 * g)), st.integers(0, room)), label="length")
    return offset, length


def run_sequence(data: st.DataObject, size: int, g: int, steps: int, check_every_step: bool) -> None:
    bitmap, model = DirtyBitmap(size, g), Model(size, g)
    ops = ["set", "reset", "reset_inward", "set_all", "clear", "merge", "resize"]
    for step in range(steps):
        op = data.draw(st.sampled_from(ops), label="op")
        size = model.size
        probes: list[int] = []
        if op == "set":
            offset, length = draw_range(data, size, g)
            bitmap.set(offset, length)
            model.set(offset, length)
            probes = [offset, offset + length]
        elif op == "reset":
            offset = g * data.draw(st.integers(0, size // g), label="offset")
            lengths = [size - offset, g * data.draw(st.integers(0, (size - offset) // g), label="granules")]
            length = data.draw(st.sampled_from(lengths), label="length")
            bitmap.reset(offset, length)
            model.reset(offset // g, -(-(offset + length) // g))
            probes = [offset, offset + length]
        elif op == "reset_inward":
            offset, length = draw_range(data, size, g)
            bitmap.reset_inward(offset, length)
            end = offset + length
            model.reset(-(-offset // g), model.bits if end == size else end // g)
            probes = [offset, end]
        elif op == "set_all":
            bitmap.set_all()
            model.dirty = set(range(model.bits))
        elif op == "clear":
            bitmap.clear()
            model.dirty.clear()
        elif op == "merge":
            g2 = data.draw(st.sampled_from([max(1, g // 4), g, 4 * g]), label="other granularity")
            other, other_model = DirtyBitmap(size, g2), Model(size, g2)
            for _ in range(data.draw(st.integers(0, 3), label="other ranges")):
                offset, length = draw_range(data, size, g2)
                other.set(offset, length)
                other_model.set(offset, length)
            bitmap.merge(other)
            for j in other_model.dirty:
                model.set(j * g2, min((j + 1) * g2, size) - j * g2)
            probes = [a * g2 for a, _ in other_model.runs()[:4]]
        else:
            new_size = data.draw(st.integers(0, 2 * size + 2 * g), label="new size")
            bitmap.resize(new_size)
            model.resize(new_size)
            probes = [size]
        probes += data.draw(st.lists(st.integers(0, model.size), max_size=3), label="probes")
        check_against(bitmap, model, probes, full=check_every_step or step == steps - 1)


# -- property tests --------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    geometry=geometries(
        st.one_of(st.just(0), st.integers(1, 200), st.integers(4030, 4170), st.just(64**2 + 64 + 1))
    ),
    data=st.data(),
)
def test_matches_set_model(geometry: tuple[int, int], data: st.DataObject) -> None:
    size, g = geometry
    run_sequence(data, size, g, steps=data.draw(st.integers(1, 8), label="steps"), check_every_step=True)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry=geometries(st.just(64**3 + 5)), data=st.data())
def test_matches_set_model_four_levels(geometry: tuple[int, int], data: st.DataObject) -> None:
    # 64**3 + 5 granules need levels of 262149, 4097, 65 and 2 bits.
    size, g = geometry
    run_sequence(data, size, g, steps=data.draw(st.integers(1, 6), label="steps"), check_every_step=False)


# -- edge cases ------------------------------------------------------------------


@pytest.mark.parametrize(("size", "granularity"), [(-1, 512), (100, 0), (100, 3), (100, -4), (100, 96)])
def test_constructor_rejects(size: int, granularity: int) -> None:
    with pytest.raises(ValueError, match=r"size|Granularity"):
        DirtyBitmap(size, granularity)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, -1), (0, 1001), (1000, 1), (1001, 0)])
def test_range_outside_bitmap(offset: int, length: int) -> None:
    bitmap = DirtyBitmap(1000, 64)
    for method in (bitmap.set, bitmap.reset, bitmap.reset_inward, bitmap.count_range):
        with pytest.raises(ValueError, match="outside"):
            method(offset, length)


def test_reset_alignment() -> None:
    bitmap = DirtyBitmap(1000, 64)
    bitmap.set_all()
    with pytest.raises(ValueError, match="aligned"):
        bitmap.reset(1, 64)
    with pytest.raises(ValueError, match="aligned"):
        bitmap.reset(64, 63)
    bitmap.reset(960, 40)  # unaligned length is fine when the range ends at size
    assert not bitmap.get(999)
    bitmap.reset(0, 0)
    assert bitmap.count_bits() == 15


def test_reset_inward_clears_only_whole_granules() -> None:
    bitmap = DirtyBitmap(1000, 64)
    bitmap.set_all()
    bitmap.reset_inward(10, 200)  # [10, 210) holds granules 1 and 2 entirely
    assert list(bitmap.dirty_areas()) == [(0, 64), (192, 808)]
    bitmap.reset_inward(900, 100)  # reaches size: the partial last granule goes too
    assert list(bitmap.dirty_areas()) == [(0, 64), (192, 768)]
    bitmap.reset_inward(300, 10)  # no whole granule inside
    assert bitmap.count_bits() == 13


def test_set_widens_outward_and_count_exceeds_size() -> None:
    bitmap = DirtyBitmap(1000, 64)
    bitmap.set(999, 1)
    assert bitmap.count() == 64  # the whole last granule, past size
    assert bitmap.count_range(990, 10) == 64
    bitmap.set(63, 2)
    assert list(bitmap.dirty_areas()) == [(0, 128), (960, 40)]
    assert bitmap.next_dirty_area(0, 1000, 1000) == (0, 128)
    assert bitmap.next_dirty_area(100, 1000, 1000) == (100, 28)
    assert bitmap.next_dirty_area(128, 1000, 10) == (960, 10)


def test_queries_validate_and_clip() -> None:
    bitmap = DirtyBitmap(1000, 64)
    bitmap.set(0, 1000)
    with pytest.raises(ValueError, match="outside"):
        bitmap.get(1000)
    with pytest.raises(ValueError, match="Offset"):
        bitmap.next_dirty(-1)
    with pytest.raises(ValueError, match="Offset"):
        list(bitmap.dirty_areas(-1))
    with pytest.raises(ValueError, match="max_length"):
        bitmap.next_dirty_area(0, 1000, 0)
    assert bitmap.next_dirty(1000) is None
    assert bitmap.next_dirty(5, 5) is None
    assert bitmap.next_dirty(5, 10**9) == 5
    assert bitmap.next_clean(0, 10**9) is None
    assert list(bitmap.dirty_areas(500, 10**9)) == [(500, 500)]


def test_empty_bitmap() -> None:
    bitmap = DirtyBitmap(0, 512)
    bitmap.set(0, 0)
    bitmap.set_all()
    bitmap.reset(0, 0)
    assert bitmap.is_empty()
    assert bitmap.next_dirty(0) is None
    assert bitmap.next_clean(0) is None
    assert list(bitmap.dirty_areas()) == []
    assert bitmap.serialize() == b""
    assert DirtyBitmap.deserialize(0, 512, b"") == bitmap


def test_merge_different_sizes() -> None:
    with pytest.raises(ValueError, match="different sizes"):
        DirtyBitmap(1000, 64).merge(DirtyBitmap(1024, 64))


def test_merge_coarser_into_finer() -> None:
    fine, coarse = DirtyBitmap(1000, 4), DirtyBitmap(1000, 16)
    coarse.set(17, 1)  # granule 1 = bytes [16, 32)
    coarse.set(999, 1)  # last granule = bytes [992, 1000), partial
    fine.merge(coarse)
    assert list(fine.dirty_areas()) == [(16, 16), (992, 8)]
    assert fine.count_bits() == 6


def test_merge_finer_into_coarser() -> None:
    fine, coarse = DirtyBitmap(1000, 1), DirtyBitmap(1000, 64)
    fine.set(5, 1)
    fine.set(127, 2)  # straddles granules 1 and 2 of the coarse bitmap
    coarse.merge(fine)
    assert list(coarse.dirty_areas()) == [(0, 192)]


def test_merge_same_granularity_sparse_and_dense() -> None:
    size = 64**3 * 512
    a, b = DirtyBitmap(size, 512), DirtyBitmap(size, 512)
    a.set(0, 512)
    b.set(size // 2, 3 * 512)
    b.set(size - 1, 1)
    a.merge(b)
    assert list(a.dirty_areas()) == [(0, 512), (size // 2, 1536), (size - 512, 512)]
    b.set_all()
    a.merge(b)
    assert a == b
    check_towers(a)


def test_copy_is_independent() -> None:
    bitmap = DirtyBitmap(10 * MiB, 64 * KiB)
    bitmap.set(MiB, MiB)
    clone = bitmap.copy()
    assert clone == bitmap
    clone.set_all()
    bitmap.reset(MiB, 64 * KiB)
    assert list(bitmap.dirty_areas()) == [(MiB + 64 * KiB, MiB - 64 * KiB)]
    assert clone.count() == 10 * MiB
    check_towers(clone)
    check_towers(bitmap)


def test_equality() -> None:
    a, b = DirtyBitmap(1024, 64), DirtyBitmap(1024, 128)
    assert a != b
    assert a != DirtyBitmap(960, 64)
    assert a != "bitmap"
    a.set(0, 1)
    assert a != DirtyBitmap(1024, 64)


def test_serialize_bit_order() -> None:
    bitmap = DirtyBitmap(10 * 512 + 1, 512)  # 11 granules -> 2 bytes
    bitmap.set(0, 1)
    bitmap.set(9 * 512, 1)
    bitmap.set(10 * 512, 1)
    assert bitmap.serialize() == bytes([0b0000_0001, 0b0000_0110])


def test_deserialize_length_and_tail_bits() -> None:
    with pytest.raises(ValueError, match="2 bytes"):
        DirtyBitmap.deserialize(11 * 512, 512, b"\x00")
    bitmap = DirtyBitmap.deserialize(11 * 512, 512, b"\x00\xff")  # tail bits 11..15 are ignored
    assert list(bitmap.dirty_areas()) == [(8 * 512, 3 * 512)]
    assert bitmap.serialize() == b"\x00\x07"


def test_resize() -> None:
    bitmap = DirtyBitmap(1000, 64)
    bitmap.set(900, 100)
    bitmap.resize(5000)  # the old partial granule stays dirty and now covers 64 bytes
    assert list(bitmap.dirty_areas()) == [(896, 128)]
    bitmap.set_all()
    bitmap.resize(100)
    assert bitmap.count_bits() == 2
    assert bitmap.serialize() == b"\x03"
    with pytest.raises(ValueError, match="size"):
        bitmap.resize(-1)
    check_towers(bitmap)


def test_one_word_updates_climb_both_towers_to_the_top() -> None:
    # A range inside one word of level 0 takes its own path (a mask, then a climb while summaries flip):
    # a single bit that empties or fills its word must change every level of the tower above it, in a
    # bitmap of four levels (262149, 4097, 65 and 2 bits), at the first and the last granule.
    bitmap = DirtyBitmap(64**3 + 5, 1)
    for gi in (0, 64**3 + 4):
        bitmap.set(gi, 1)  # a word, and everything above it, becomes non-zero
        check_towers(bitmap)
        assert bitmap.next_dirty(0) == gi and next(bitmap.dirty_areas()) == (gi, 1)
        bitmap.reset(gi, 1)
        check_towers(bitmap)
        assert bitmap.is_empty() and bitmap.next_dirty(0) is None
        bitmap.set_all()
        bitmap.reset(gi, 1)  # a full word, and everything above it, stops being full
        check_towers(bitmap)
        assert bitmap.next_clean(0) == gi and bitmap.count_bits() == 64**3 + 4
        bitmap.set(gi, 1)
        check_towers(bitmap)
        assert bitmap.next_clean(0) is None
        bitmap.reset(gi + 1 if gi == 0 else gi - 2, 2)  # two bits in one word: count and stamps
        cleaned = bitmap.cleaned
        bitmap.reset(gi + 1 if gi == 0 else gi - 2, 2)  # no change: no new stamp
        assert bitmap.cleaned == cleaned and bitmap.count_bits() == 64**3 + 3
        bitmap.clear()
        check_towers(bitmap)


# -- a 16 TiB disk -----------------------------------------------------------------


def test_16_tib_bitmap_is_sparse_in_cost() -> None:
    size, g = 16 * TiB, 64 * KiB
    tracemalloc.start()
    try:
        bitmap = DirtyBitmap(size, g)
        ranges = [(3 * TiB + 5, MiB), (7 * TiB, 64 * KiB), (size - 100, 100)]
        for offset, length in ranges:
            bitmap.set(offset, length)
        assert bitmap.next_dirty(0) == 3 * TiB
        assert bitmap.next_dirty_area(0, size, 64 * MiB) == (3 * TiB, MiB + 64 * KiB)
        assert list(bitmap.dirty_areas()) == [
            (3 * TiB, MiB + 64 * KiB),
            (7 * TiB, 64 * KiB),
            (size - 64 * KiB, 64 * KiB),
        ]
        assert bitmap.count_range(0, size) == MiB + 3 * 64 * KiB
        # Dense is as cheap to walk as sparse, and nothing allocates in proportion to the disk.
        bitmap.set_all()
        bitmap.reset(5 * TiB, MiB)
        assert list(bitmap.dirty_areas()) == [(0, 5 * TiB), (5 * TiB + MiB, 11 * TiB - MiB)]
        assert bitmap.next_clean(0) == 5 * TiB
        bitmap.clear()
        assert bitmap.is_empty()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * MiB, f"peak {peak / MiB:.1f} MiB"
