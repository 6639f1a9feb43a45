"""Named dirty bitmaps against a plain model: sets of dirty granules and a few flags.

Any sequence of writes (any offset and length), enables, disables, clears, merges, successor creation,
abdicate and reclaim leaves every bitmap of the node with exactly the granules the model says, with the
model's recording/busy state, in QEMU's order (newest first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from cowbackup.block.dirty_bitmaps import BitmapError, NodeDirtyBitmap
from cowbackup.block.drivers.memory import MemoryNode

SIZE = 64 * 1024 + 1000  # a partial last granule for every granularity below
GRANULARITIES = (512, 4096, 16384)
NAMES = ("a", "b", "c")


@dataclass
class Model:
    """One named bitmap: its granules, and its successor's while frozen."""

    granularity: int
    bits: set[int] = field(default_factory=set)
    disabled: bool = False
    successor: set[int] | None = None
    successor_disabled: bool = False


def granules(offset: int, length: int, g: int) -> set[int]:
    return set(range(offset // g, (offset + length + g - 1) // g)) if length else set()


def actual(bm: NodeDirtyBitmap) -> set[int]:
    g = bm.granularity
    return {n for n in range((SIZE + g - 1) // g) if bm.bits.get(n * g)}


op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(NAMES), st.sampled_from(GRANULARITIES)),
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(0, 20000)),
    st.tuples(
        st.sampled_from(("enable", "disable", "clear", "freeze", "abdicate", "reclaim")),
        st.sampled_from(NAMES),
    ),
    st.tuples(st.just("merge"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=40))
def test_bitmaps_match_the_set_model(ops: list[tuple[object, ...]]) -> None:
    reg = MemoryNode("m", SIZE).dirty_bitmaps
    model: dict[str, Model] = {}
    # Newest first, as the registry lists its bitmaps; ("succ", name) is the successor of ``name``.
    order: list[str | tuple[str, str]] = []
    for kind, *args in ops:
        if kind == "add":
            name, g = str(args[0]), int(str(args[1]))
            if name in model:
                continue
            reg.create(name, g)
            model[name] = Model(g)
            order.insert(0, name)
        elif kind == "write":
            offset, length = int(str(args[0])), min(int(str(args[1])), SIZE - int(str(args[0])))
            reg.mark(offset, length)
            for m in model.values():
                if not m.disabled:
                    m.bits |= granules(offset, length, m.granularity)
                if m.successor is not None and not m.successor_disabled:
                    m.successor |= granules(offset, length, m.granularity)
        elif kind == "merge":
            dst, src = str(args[0]), str(args[1])
            if dst not in model or src not in model:
                continue
            target = reg.find(dst)
            assert target is not None
            source = reg.find(src)
            assert source is not None
            target.merge_from(source)
            gd, gs = model[dst].granularity, model[src].granularity
            for n in list(model[src].bits):
                model[dst].bits |= granules(n * gs, min(gs, SIZE - n * gs), gd)
        else:
            name = str(args[0])
            bm = reg.find(name)
            if bm is None:
                continue
            m = model[name]
            refused = (kind == "freeze") == (m.successor is not None) and kind in (
                "freeze",
                "abdicate",
                "reclaim",
            )
            try:
                apply(kind, bm, m)
            except BitmapError:
                assert refused, (kind, name)
            else:
                assert not refused, (kind, name)
                if kind == "freeze":
                    order.insert(0, ("succ", name))
                elif kind == "abdicate":
                    order.remove(name)
                    order[order.index(("succ", name))] = name
                elif kind == "reclaim":
                    order.remove(("succ", name))
        for name, m in model.items():
            bm = reg.find(name)
            assert bm is not None
            assert actual(bm) == m.bits, (name, kind)
            assert bm.busy == (m.successor is not None)
            assert bm.recording == (not m.disabled or (m.successor is not None and not m.successor_disabled))
            if m.successor is not None:
                assert bm.successor is not None and actual(bm.successor) == m.successor
    parents = {id(bm.successor): bm.name for bm in reg if bm.successor is not None}
    assert [bm.name if bm.name is not None else ("succ", parents[id(bm)]) for bm in reg] == order


def apply(kind: object, bm: NodeDirtyBitmap, m: Model) -> None:
    """Do ``kind`` on the bitmap, then (if it was not refused) on the model."""
    if kind == "enable":
        bm.enable()
        m.disabled = False
    elif kind == "disable":
        bm.disable()
        m.disabled = True
    elif kind == "clear":
        bm.clear()
        m.bits = set()
    elif kind == "freeze":
        bm.create_successor()
        m.successor, m.successor_disabled, m.disabled = set(), m.disabled, True
    elif kind == "abdicate":
        bm.abdicate()
        assert m.successor is not None
        m.bits, m.disabled, m.successor = m.successor, m.successor_disabled, None
    elif kind == "reclaim":
        bm.reclaim()
        assert m.successor is not None
        m.bits |= m.successor
        m.disabled, m.successor = m.successor_disabled, None
