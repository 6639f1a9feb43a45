"""Hierarchical dirty bitmap, byte-addressed with a granularity (QEMU's HBitmap).

A :class:`DirtyBitmap` tracks which *granules* (``granularity`` bytes each) of a
device of ``size`` bytes are dirty. It serves as the backup engine's "still to
copy" bitmap and as the persistent dirty bitmap of incremental backups.

Layout
------
Level 0 holds one bit per granule in 64-bit words. Each level above holds one
bit per word of the level below, so every level is 64 times smaller and a search
climbs until it finds a non-empty word, then descends one word per level::

    level 2   ..1.                                    1 bit per level-1 word
                |
    level 1   ..1.......  ..........  ..........      1 bit per level-0 word
                |
    level 0   [w0][w1][w2]...[w63]  [w64]...          bit i = granule i

There are two such towers over the same level 0:

* the *any* tower: a bit is 1 when its word below has a set bit, used by
  :meth:`DirtyBitmap.next_dirty`;
* the *full* tower: a bit is 1 when its word below is all ones, used by
  :meth:`DirtyBitmap.next_clean` (and so to find where a dirty run ends), so
  that a nearly full bitmap is as cheap to walk as a nearly clean one.

Bits past the end of a level ("padding") are 0 in level 0 and in the any tower,
and 1 in the full tower, so no search ever stops on a padding bit of an upper
level; a padding bit of level 0 may be found as "clean" and is clipped away.

The word-level operations (fill, overwrite, summarise, search) are in
:mod:`cowbackup.block._bitwords`; this module maps bytes to granules and keeps
the count and both towers in step with level 0.

Memory for 16 TiB at 64 KiB granularity: 2**44 / 2**16 = 2**28 granules, so
level 0 is 2**28 bits = 32 MiB. Each tower adds 2**22 + 2**16 + 2**10 + 16 bits
(about 520 KiB), so the whole bitmap is about 33 MiB. A search touches one word
per level (five levels here), whatever the size of the clean area it skips.

Serialized format
-----------------
:meth:`DirtyBitmap.serialize` returns level 0 as ``ceil(bits / 8)`` bytes: bit
``i`` (granule ``i``) is bit ``i % 8`` of byte ``i // 8``, least significant bit
first, and the unused bits of the last byte are zero. This is the bit order of
QEMU's qcow2 bitmap data, so a qcow2 module can store the bytes as they are.

Change stamps
-------------
``dirtied`` and ``cleaned`` change whenever some granule goes from clean to dirty, or from dirty to clean,
and a new bitmap (made, copied, deserialized, resized) starts with fresh ones.  They come from one counter
for all bitmaps, so a value is never seen twice, even on another bitmap: a reader that remembers what it
concluded from a bitmap (the copy-before-write filter's cache of clusters a write may pass) knows that
nothing relevant changed while the stamp it remembered is still the bitmap's.

Thread safety: none. A bitmap is owned by the one event loop thread that owns
its block node (QEMU protects its bitmaps with the BQL / bitmap mutex instead).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterator

from cowbackup.block._bitwords import (
    CHUNK,
    LITTLE,
    M64,
    fill_bits,
    find,
    summarize,
    tower_bits,
    words_from_int,
    words_to_int,
    write_bits,
    zero_words,
)

__all__ = ["DirtyBitmap"]

#: Change stamps of every bitmap (see "Change stamps" above).
_STAMPS = itertools.count(1)


def _flip_summary(tower: list[array[int]], w: int, *, full: bool) -> None:
    """Flip the summary bit of level-0 word ``w`` in ``tower`` (whose summary just changed), and climb
    while the word holding that bit changes its own summary: non-zero, or all ones if ``full``."""
    for level in tower:
        i = w >> 6
        old = level[i]
        new = old ^ (1 << (w & 63))
        level[i] = new
        if (old != M64 and new != M64) if full else (old and new):
            return
        w = i


class DirtyBitmap:
    """A dirty bitmap of ``size`` bytes with one bit per ``granularity`` bytes.

    Byte ranges are mapped to granules: :meth:`set` widens a range outward to
    whole granules, :meth:`reset` requires an aligned range, and
    :meth:`reset_inward` narrows it. The last granule may extend past ``size``.
    """

    def __init__(self, size: int, granularity: int) -> None:
        """Create a clean bitmap.

        Raises ValueError if ``size`` is negative or ``granularity`` is not a
        power of two >= 1.
        """
        if size < 0:
            raise ValueError(f"Bitmap size must be >= 0, got {size}")
        if granularity < 1 or granularity & (granularity - 1):
            raise ValueError(f"Granularity must be a power of two >= 1, got {granularity}")
        self._granularity = granularity
        self._shift = granularity.bit_length() - 1
        self._allocate(size)

    def _allocate(self, size: int) -> None:
        # _allocate (construction, resize) replaces these fields together; the
        # update methods change _l0, _count and the towers in place.
        self._size = size
        self.dirtied = self.cleaned = next(_STAMPS)
        self._bits = (size + self._granularity - 1) >> self._shift
        self._l0: array[int] = zero_words((self._bits + 63) >> 6)
        self._count = 0  # set bits of level 0, kept exact by every update
        self._any: list[array[int]] = []
        self._full: list[array[int]] = []
        for nbits in tower_bits(self._bits):
            nwords = (nbits + 63) >> 6
            self._any.append(zero_words(nwords))
            full = zero_words(nwords)
            fill_bits(full, nbits, 64 * nwords, True)  # padding of the full tower
            self._full.append(full)
        # A clean level 0 has no non-zero and no full word, so zeroed towers
        # (plus the padding above) are already correct.

    # -- properties ------------------------------------------------------------

    @property
    def size(self) -> int:
        """Size of the tracked device in bytes."""
        return self._size

    @property
    def granularity(self) -> int:
        """Bytes per bit."""
        return self._granularity

    # -- internal helpers ------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(
                f"Range offset={offset} length={length} is outside the bitmap of size {self._size}"
            )

    def _granules_outward(self, offset: int, length: int) -> tuple[int, int]:
        g = self._granularity
        return offset >> self._shift, (offset + length + g - 1) >> self._shift

    def _fill(self, a: int, b: int, value: bool) -> None:
        """Set granules [a, b) to ``value`` and update count and towers."""
        if a >= b:
            return
        w = a >> 6
        if w == (b - 1) >> 6:
            # Inside one word of level 0 -- a copy's claim and finish, a guest write's cluster: one
            # mask, and each tower climbed only while a summary bit flips.
            l0 = self._l0
            old = l0[w]
            mask = ((1 << (b - a)) - 1) << (a & 63)
            new = old | mask if value else old & ~mask
            if new == old:
                return
            l0[w] = new
            if value:
                self._count += (new ^ old).bit_count()
                self.dirtied = next(_STAMPS)
            else:
                self._count -= (new ^ old).bit_count()
                self.cleaned = next(_STAMPS)
            if not old or not new:  # the word's "has a set bit" changed
                _flip_summary(self._any, w, full=False)
            if old == M64 or new == M64:  # its "is all ones" changed
                _flip_summary(self._full, w, full=True)
            return
        flipped = fill_bits(self._l0, a, b, value)
        if not flipped:
            return
        if value:
            self._count += flipped
            self.dirtied = next(_STAMPS)
        else:
            self._count -= flipped
            self.cleaned = next(_STAMPS)
        for tower, full in ((self._any, False), (self._full, True)):
            src, lo, hi = self._l0, a, b - 1  # changed bits of `src`, inclusive
            for dst in tower:
                wl, wh = lo >> 6, hi >> 6
                # Words strictly inside the range now hold only `value`, so
                # their summary bit is `value` in both towers.
                fill_bits(dst, wl + 1, wh, value)
                changed = self._update_summary(dst, wl, src[wl], full)
                if wh != wl:
                    self._update_summary(dst, wh, src[wh], full)
                elif not changed:
                    break  # nothing above can change either
                src, lo, hi = dst, wl, wh

    @staticmethod
    def _update_summary(dst: array[int], w: int, word: int, full: bool) -> bool:
        bit = word == M64 if full else word != 0
        i, mask = w >> 6, 1 << (w & 63)
        old = dst[i]
        new = old | mask if bit else old & ~mask
        if new == old:
            return False
        dst[i] = new
        return True

    def _resummarize(self, wa: int, wb: int) -> None:
        """Recompute both towers after level-0 words [wa, wb] changed arbitrarily."""
        for tower, full in ((self._any, False), (self._full, True)):
            src, lo, hi = self._l0, wa, wb  # changed words of `src`, inclusive
            for dst in tower:
                write_bits(dst, lo, hi - lo + 1, summarize(src, lo, hi + 1, full))
                src, lo, hi = dst, lo >> 6, hi >> 6

    def _rebuild(self) -> None:
        """Recompute count and towers from level 0 (after a bulk load)."""
        words = len(self._l0)
        self._count = 0
        for w in range(0, words, CHUNK):
            end = min(w + CHUNK, words)
            self._count += words_to_int(self._l0, w, end).bit_count()
            self._resummarize(w, end - 1)

    def _next_nonzero_word(self, w: int) -> int | None:
        if self._any:
            return find(self._any, 1, w)
        return w if w < len(self._l0) and self._l0[w] else None

    def _popcount(self, a: int, b: int) -> int:
        """Set bits among granules [a, b), skipping clean chunks via the any tower."""
        if a >= b:
            return 0
        l0 = self._l0
        wa, wb = a >> 6, (b - 1) >> 6
        head = (M64 << (a & 63)) & M64
        tail = M64 >> (63 - ((b - 1) & 63))
        if wa == wb:
            return (l0[wa] & head & tail).bit_count()
        total = (l0[wa] & head).bit_count() + (l0[wb] & tail).bit_count()
        w: int | None = wa + 1
        while w is not None and w < wb:
            w = self._next_nonzero_word(w)
            if w is None or w >= wb:
                break
            end = min(w + CHUNK, wb)
            total += words_to_int(l0, w, end).bit_count()
            w = end
        return total

    def _next_bit(self, value: bool, gi: int) -> int | None:
        """First granule >= gi with the given state (may be a level-0 padding bit)."""
        if gi >= self._bits:
            return None
        if value:  # a dirty granule: follow "word has a set bit"
            return find([self._l0, *self._any], 1, gi)
        # a clean granule: follow "word is not all ones", i.e. a 0 in the full tower
        return find([self._l0, *self._full], 0, gi)

    # -- modification ----------------------------------------------------------

    def set(self, offset: int, length: int) -> None:
        """Mark dirty every granule that touches [offset, offset + length).

        A zero length is a no-op. Raises ValueError if the range is not within
        [0, size].
        """
        # The checks and the granule arithmetic inline: every write marks its node's bitmaps, and a
        # copy sets and clears bits for each cluster.
        if offset < 0 or length < 0 or offset + length > self._size:
            self._check_range(offset, length)
        if length:
            shift = self._shift
            self._fill(offset >> shift, (offset + length + self._granularity - 1) >> shift, True)

    def reset(self, offset: int, length: int) -> None:
        """Mark clean the granules of [offset, offset + length).

        ``offset`` must be a multiple of the granularity, and ``length`` too
        unless the range ends at ``size`` (which clears the partial last
        granule). Raises ValueError otherwise or if the range is out of bounds.
        Use :meth:`reset_inward` for unaligned ranges.
        """
        if offset < 0 or length < 0 or offset + length > self._size:
            self._check_range(offset, length)
        g = self._granularity
        if (offset | length) & (g - 1) and (offset & (g - 1) or offset + length != self._size):
            raise ValueError(f"Range offset={offset} length={length} is not aligned to granularity {g}")
        if length:
            shift = self._shift
            self._fill(offset >> shift, (offset + length + g - 1) >> shift, False)

    def reset_inward(self, offset: int, length: int) -> None:
        """Mark clean only the granules lying entirely inside the range.

        The partial last granule counts as inside when the range reaches
        ``size``. Raises ValueError if the range is not within [0, size].
        """
        self._check_range(offset, length)
        g = self._granularity
        a = (offset + g - 1) >> self._shift
        end = offset + length
        b = self._bits if end == self._size else end >> self._shift
        self._fill(a, b, False)

    def set_all(self) -> None:
        """Mark every granule dirty."""
        self._fill(0, self._bits, True)

    def clear(self) -> None:
        """Mark every granule clean."""
        self._fill(0, self._bits, False)

    def merge(self, other: DirtyBitmap) -> None:
        """Mark dirty everything that is dirty in ``other`` (self |= other).

        The granularities may differ: each dirty granule of ``other`` dirties
        every granule of this bitmap that it overlaps. Raises ValueError if the
        sizes differ.
        """
        if other._size != self._size:
            raise ValueError(
                f"Bitmaps are of different sizes ({self._size} and {other._size}) and can't be merged"
            )
        if other._granularity != self._granularity:
            for start, length in other.dirty_areas():
                self.set(start, length)
            return
        # Same layout: OR level 0 chunk by chunk, visiting only the chunks in
        # which `other` has a set bit.
        words = len(other._l0)
        w: int | None = 0
        while w is not None and w < words:
            w = other._next_nonzero_word(w)
            if w is None:
                break
            end = min(w + CHUNK, words)
            mine = words_to_int(self._l0, w, end)
            merged = mine | words_to_int(other._l0, w, end)
            if merged != mine:
                self.dirtied = next(_STAMPS)
                self._l0[w:end] = words_from_int(merged, end - w)
                self._count += merged.bit_count() - mine.bit_count()
                self._resummarize(w, end - 1)
            w = end

    def resize(self, size: int) -> None:
        """Change the size. Growing adds clean granules; shrinking drops the
        granules past the new end. Raises ValueError if ``size`` is negative.
        """
        if size < 0:
            raise ValueError(f"Bitmap size must be >= 0, got {size}")
        old_l0, old_bits = self._l0, self._bits
        self._allocate(size)
        keep = min(old_bits, self._bits)
        nwords = (keep + 63) >> 6
        self._l0[:nwords] = old_l0[:nwords]
        # Granules past the new end must not survive as level-0 padding.
        fill_bits(self._l0, keep, 64 * len(self._l0), False)
        self._rebuild()

    # -- queries ---------------------------------------------------------------

    def get(self, offset: int) -> bool:
        """Whether the granule holding byte ``offset`` is dirty.

        Raises ValueError unless 0 <= offset < size.
        """
        if not 0 <= offset < self._size:
            raise ValueError(f"Offset {offset} is outside the bitmap of size {self._size}")
        gi = offset >> self._shift
        return bool(self._l0[gi >> 6] >> (gi & 63) & 1)

    def count(self) -> int:
        """Dirty bytes, counted in whole granules (as QEMU does): this may
        exceed ``size`` when the last granule is partial and dirty."""
        return self._count << self._shift

    def count_bits(self) -> int:
        """Number of dirty granules."""
        return self._count

    def is_empty(self) -> bool:
        """Whether no granule is dirty."""
        return self._count == 0

    def count_range(self, offset: int, length: int) -> int:
        """Dirty bytes, in whole granules, of the granules touching the range.

        Raises ValueError if the range is not within [0, size].
        """
        self._check_range(offset, length)
        if not length:
            return 0
        return self._popcount(*self._granules_outward(offset, length)) << self._shift

    def all_clean(self, offset: int, end: int) -> bool:
        """Whether no granule touching [offset, end) is dirty (``end`` clipped to ``size``).

        The question of a request path (is there anything to do here?): a range inside one word of
        level 0 costs a mask, not a search.  Raises ValueError if ``offset`` < 0.
        """
        a, b = self._touching(offset, end)
        if a >> 6 == (b - 1) >> 6:
            return not self._l0[a >> 6] >> (a & 63) & ((1 << (b - a)) - 1)
        return self._popcount(a, b) == 0

    def all_dirty(self, offset: int, end: int) -> bool:
        """Whether every granule touching [offset, end) is dirty (``end`` clipped to ``size``; true of
        an empty range, as ``all()``)."""
        a, b = self._touching(offset, end)
        if a >= b:
            return True
        mask = (1 << (b - a)) - 1
        if a >> 6 == (b - 1) >> 6:
            return self._l0[a >> 6] >> (a & 63) & mask == mask
        return self._popcount(a, b) == b - a

    def _touching(self, offset: int, end: int) -> tuple[int, int]:
        """The granules touching [offset, end) as [a, b): (0, 0) for an empty range; (a, a+1) when
        the range lies in one granule."""
        if offset < 0:
            raise ValueError(f"Offset must be >= 0, got {offset}")
        if end > self._size:
            end = self._size
        if offset >= end:
            return 0, 0
        return offset >> self._shift, ((end - 1) >> self._shift) + 1

    def _next(self, value: bool, offset: int, end: int | None) -> int | None:
        if offset < 0:
            raise ValueError(f"Offset must be >= 0, got {offset}")
        stop = self._size if end is None else min(end, self._size)
        if offset >= stop:
            return None
        gi = self._next_bit(value, offset >> self._shift)
        if gi is None:
            return None
        found = max(offset, gi << self._shift)
        return found if found < stop else None

    def next_dirty(self, offset: int, end: int | None = None) -> int | None:
        """Smallest byte offset in [offset, end) whose granule is dirty.

        Returns ``offset`` itself when its granule is dirty, otherwise the start
        of the next dirty granule; None if there is none. ``end`` defaults to
        and is clipped to ``size``. Raises ValueError if ``offset`` < 0.
        """
        return self._next(True, offset, end)

    def next_clean(self, offset: int, end: int | None = None) -> int | None:
        """Like :meth:`next_dirty`, for a clean granule."""
        return self._next(False, offset, end)

    def next_dirty_area(self, offset: int, end: int, max_length: int) -> tuple[int, int] | None:
        """The first dirty area in [offset, end) as ``(start, length)``, or None.

        ``start`` is the first dirty byte (see :meth:`next_dirty`); the area
        runs to the first clean granule, ``end`` or ``start + max_length``,
        whichever comes first. ``end`` is clipped to ``size``. Raises
        ValueError if ``offset`` < 0 or ``max_length`` < 1.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        start = self.next_dirty(offset, end)
        if start is None:
            return None
        stop = min(end, self._size, start + max_length)
        clean = self.next_clean(start, stop)
        return start, (stop if clean is None else clean) - start

    def dirty_areas(self, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Yield the maximal dirty runs as ``(start, length)`` in byte units,
        clipped to [offset, end) and to ``size``.

        The bitmap must not be modified while the iterator is in use. Raises
        ValueError if ``offset`` < 0.
        """
        if offset < 0:
            raise ValueError(f"Offset must be >= 0, got {offset}")
        stop = self._size if end is None else min(end, self._size)
        pos = offset
        while pos < stop:
            start = self.next_dirty(pos, stop)
            if start is None:
                return
            clean = self.next_clean(start, stop)
            pos = stop if clean is None else clean
            yield start, pos - start

    # -- copying and serialization -------------------------------------------

    def copy(self) -> DirtyBitmap:
        """An independent copy."""
        new = DirtyBitmap.__new__(DirtyBitmap)
        new._granularity = self._granularity
        new._shift = self._shift
        new._size = self._size
        new._bits = self._bits
        new.dirtied = new.cleaned = next(_STAMPS)
        new._count = self._count
        new._l0 = self._l0[:]
        new._any = [level[:] for level in self._any]
        new._full = [level[:] for level in self._full]
        return new

    def serialize(self) -> bytes:
        """Level 0 as ``ceil(bits / 8)`` LSB-first bytes (see the module docstring)."""
        nbytes = (self._bits + 7) >> 3
        if LITTLE:
            return memoryview(self._l0).cast("B")[:nbytes].tobytes()
        words = self._l0[:]  # pragma: no cover - big-endian hosts only
        words.byteswap()  # pragma: no cover
        return words.tobytes()[:nbytes]  # pragma: no cover

    @classmethod
    def deserialize(cls, size: int, granularity: int, data: bytes) -> DirtyBitmap:
        """Build a bitmap from :meth:`serialize` output.

        Unused bits of the last byte are ignored. Raises ValueError if ``data``
        is not ``ceil(ceil(size / granularity) / 8)`` bytes long, or for the
        errors of the constructor.
        """
        bitmap = cls(size, granularity)
        nbytes = (bitmap._bits + 7) >> 3
        if len(data) != nbytes:
            raise ValueError(f"Serialized bitmap must be {nbytes} bytes, got {len(data)}")
        words = bitmap._l0
        with memoryview(words) as view, view.cast("B") as raw:
            raw[:nbytes] = data
        if not LITTLE:  # pragma: no cover - big-endian hosts only
            words.byteswap()
        fill_bits(words, bitmap._bits, 64 * len(words), False)
        bitmap._rebuild()
        return bitmap

    # -- comparison ------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return (
            self._size == other._size
            and self._granularity == other._granularity
            and self._count == other._count
            and self._l0 == other._l0
        )

    def __repr__(self) -> str:
        return (
            f"DirtyBitmap(size={self._size}, granularity={self._granularity}, dirty_granules={self._count})"
        )
