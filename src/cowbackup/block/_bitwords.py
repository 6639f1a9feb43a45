"""Bulk bit operations on 64-bit word arrays, at C speed: the machinery under :mod:`~cowbackup.block.bitmap`.

Every level of a :class:`~cowbackup.block.bitmap.DirtyBitmap` is an ``array('Q')`` in which bit ``i`` is
bit ``i % 64`` of word ``i // 64``.  The functions here fill, overwrite, count and summarise runs of such
words without a Python loop per word: a run becomes one ``int`` (``int.from_bytes`` over a memoryview) or
one slice assignment, and long runs are walked :data:`CHUNK` words at a time so that no temporary grows
with the range.  :func:`find` is the search that climbs and descends the towers (see the bitmap module
docstring for the layout).

They deal in bits and words only: granules, byte offsets, the dirty count and keeping the towers in step
with level 0 are the bitmap's business.
"""

from __future__ import annotations

import sys
from array import array

M64 = (1 << 64) - 1

# Words per chunk when a range operation walks level 0: bounds the temporary
# objects to 64 KiB while keeping the number of Python iterations small.
CHUNK = 8192

LITTLE = sys.byteorder == "little"

if array("Q").itemsize != 8:  # pragma: no cover - every CPython platform has 8-byte 'Q'
    raise ImportError("cowbackup.block.bitmap needs an 8-byte array('Q')")

ONES = array("Q", [M64]) * CHUNK
ZEROS = array("Q", [0]) * CHUNK

# bytes.translate tables mapping a byte to a 0/1 flag (see summarize).
IS_NONZERO = bytes([0] + [1] * 255)
IS_FF = bytes([0] * 255 + [1])


def words_to_int(words: array[int], i: int, j: int) -> int:
    """Words [i, j) as one integer, word i least significant."""
    if LITTLE:
        return int.from_bytes(memoryview(words)[i:j], "little")
    return int.from_bytes(words_to_bytes(words, i, j), "little")  # pragma: no cover


def words_to_bytes(words: array[int], i: int, j: int) -> bytes:
    """Words [i, j) as little-endian bytes."""
    if LITTLE:
        return memoryview(words)[i:j].tobytes()
    part = words[i:j]  # pragma: no cover - big-endian hosts only
    part.byteswap()  # pragma: no cover
    return part.tobytes()  # pragma: no cover


def zero_words(n: int) -> array[int]:
    # Repetition allocates exactly n words, with no n-sized temporary.
    return array("Q", [0]) * n


def words_from_int(value: int, n: int) -> array[int]:
    """The inverse of words_to_int for n words."""
    words = array("Q", value.to_bytes(8 * n, "little"))
    if not LITTLE:  # pragma: no cover - big-endian hosts only
        words.byteswap()
    return words


def lowest_bit(word: int) -> int:
    return (word & -word).bit_length() - 1


def fill_bits(words: array[int], a: int, b: int, value: bool) -> int:
    """Set bits [a, b) of ``words`` to ``value``; return how many bits flipped."""
    if a >= b:
        return 0
    wa, wb = a >> 6, (b - 1) >> 6
    head = (M64 << (a & 63)) & M64
    tail = M64 >> (63 - ((b - 1) & 63))
    if wa == wb:
        return fill_word(words, wa, head & tail, value)
    flipped = fill_word(words, wa, head, value) + fill_word(words, wb, tail, value)
    # Whole words in the middle: slice assignment, chunked so that neither the
    # popcount temporary nor the source array grows with the range.
    w = wa + 1
    while w < wb:
        n = min(CHUNK, wb - w)
        ones = words_to_int(words, w, w + n).bit_count()
        flipped += 64 * n - ones if value else ones
        src = ONES if value else ZEROS
        words[w : w + n] = src if n == CHUNK else src[:n]
        w += n
    return flipped


def fill_word(words: array[int], w: int, mask: int, value: bool) -> int:
    old = words[w]
    new = old | mask if value else old & ~mask
    words[w] = new
    return abs(new.bit_count() - old.bit_count())


def write_bits(words: array[int], lo: int, n: int, value: int) -> None:
    """Overwrite bits [lo, lo + n) of ``words`` with the n low bits of ``value``."""
    wa, wb = lo >> 6, (lo + n - 1) >> 6
    shift = lo & 63
    keep_head = words[wa] & ((1 << shift) - 1)
    end = (lo + n - 1) & 63
    keep_tail = words[wb] & ~(M64 >> (63 - end)) & M64
    span = wb - wa + 1
    merged = keep_head | (value << shift) | (keep_tail << (64 * (span - 1)))
    if span == 1:
        words[wa] = merged
    else:
        words[wa : wb + 1] = words_from_int(merged, span)


def summarize(words: array[int], i: int, j: int, full: bool) -> int:
    """Summary bits of words [i, j): bit k is 1 if word i+k is non-zero (any
    tower) or all ones (full tower)."""
    n = j - i
    if n <= 4:  # the common case of a small update: plain integer tests
        bits = 0
        for k in range(n):
            word = words[i + k]
            if (word == M64) if full else (word != 0):
                bits |= 1 << k
        return bits
    # Bulk case, all at C speed. Byte r of every word, gathered with a stride
    # of 8, is one integer; OR-ing (AND-ing) the 8 of them leaves byte k equal
    # to the OR (AND) of word k's bytes. Map those bytes to 0/1 flags and pack
    # 8 flags per byte with 8 more strided slices.
    raw = words_to_bytes(words, i, j)
    acc = int.from_bytes(raw[0::8], "little")
    for r in range(1, 8):
        part = int.from_bytes(raw[r::8], "little")
        acc = acc & part if full else acc | part
    flags = acc.to_bytes(n, "little").translate(IS_FF if full else IS_NONZERO) + bytes(-n % 8)
    packed = 0
    for r in range(8):
        packed |= int.from_bytes(flags[r::8], "little") << r
    return packed


def find(levels: list[array[int]], value: int, pos: int) -> int | None:
    """First bit >= pos of levels[0] equal to ``value``, or None.

    ``levels[k + 1]`` must summarise ``levels[k]``: its bit w equals ``value``
    exactly when word w of ``levels[k]`` holds a bit equal to ``value``. The
    search climbs while the current word has nothing at or after ``pos``, then
    descends through words that are known to hold a match.
    """
    k = 0
    top = len(levels) - 1
    while True:
        level = levels[k]
        w = pos >> 6
        if w >= len(level):
            return None
        word = level[w] if value else ~level[w]
        word &= (M64 << (pos & 63)) & M64
        if word:
            pos = (w << 6) + lowest_bit(word)
            break
        if k == top:
            return None
        pos = w + 1
        k += 1
    while k > 0:
        k -= 1
        word = levels[k][pos] if value else ~levels[k][pos] & M64
        pos = (pos << 6) + lowest_bit(word)
    return pos


def tower_bits(bits: int) -> list[int]:
    """Number of bits in each level above level 0 (the top level has one word)."""
    sizes = []
    while bits > 64:
        bits = (bits + 63) >> 6
        sizes.append(bits)
    return sizes
