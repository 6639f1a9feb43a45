"""Auditing a dirty bitmap: does it really call clean only what did not change?

An incremental takes every chunk the bitmap calls clean from its parent without reading it.  A bitmap
can lie -- a write behind the daemon's back (the image opened by another program), a bug -- and then the
snapshot silently holds stale data.  :func:`audit_clean_chunks` re-reads a random sample of the clean
chunks from the view at the new snapshot's instant and compares each with the parent's index entry
(the chunk id is the repository's hash of the data, so no chunk needs to be fetched): one mismatch
proves the bitmap wrong.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field

from cowbackup.block.node import BlockNode
from cowbackup.block.zero import is_zero
from cowbackup.repo.index import ZERO_ID
from cowbackup.repo.manifest import DiskRecord
from cowbackup.repo.repository import Repository
from cowbackup.repo.writer import DirtyTest


@dataclass
class AuditResult:
    checked: int = 0
    #: Offsets of sampled chunks whose data is not what the parent holds there.
    mismatches: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"checked": self.checked, "mismatches": len(self.mismatches)}


async def audit_clean_chunks(
    repo: Repository,
    view: BlockNode,
    parent: DiskRecord,
    dirty: DirtyTest,
    percent: float,
    rng: random.Random | None = None,
) -> AuditResult:
    """Compare ``percent`` % (at least one) of the chunks ``dirty`` calls clean, read from ``view``, with
    ``parent``'s entries."""
    cs, size, per_segment = parent.chunk_size, parent.size, parent.segment_entries
    clean = [p for p in range(parent.positions) if not dirty(p * cs, min(cs, size - p * cs))]
    if not clean or percent <= 0:
        return AuditResult()
    sample = sorted((rng or random.Random()).sample(clean, max(1, math.ceil(len(clean) * percent / 100))))
    result = AuditResult(checked=len(sample))
    loop = asyncio.get_running_loop()
    entries: dict[int, list[bytes]] = {}
    buf = bytearray(cs)
    for position in sample:
        segment = position // per_segment
        if segment not in entries:
            index = await loop.run_in_executor(None, repo.read_index, parent.segments[segment])
            entries[segment] = [e.chunk_id for e in index]
        offset = position * cs
        view_of = memoryview(buf)[: min(cs, size - offset)]
        await view.read(offset, view_of)
        found = ZERO_ID if is_zero(view_of) else await loop.run_in_executor(None, repo.hash, view_of)
        if found != entries[segment][position - segment * per_segment]:
            result.mismatches.append(offset)
    return result
