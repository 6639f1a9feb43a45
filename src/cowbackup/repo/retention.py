"""Which snapshots ``forget --keep-*`` keeps: Proxmox Backup Server's documented prune semantics.

Rules run in the order keep-last, -hourly, -daily, -weekly (ISO weeks), -monthly, -yearly.  Each walks
the snapshots newest first and keeps the newest snapshot of each of the next N periods that hold one
(periods without snapshots do not count).  A snapshot already kept or dropped by an earlier rule is
skipped, and so is a period in which an earlier rule already kept a snapshot: each rule only considers
what earlier rules left.  Whatever no rule keeps is forgotten.  Pure: no I/O.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _period(rule: str) -> Callable[[datetime.datetime], str]:
    def weekly(t: datetime.datetime) -> str:
        year, week, _ = t.isocalendar()
        return f"{year}/{week}"

    formats = {"hourly": "%Y/%m/%d/%H", "daily": "%Y/%m/%d", "monthly": "%Y/%m", "yearly": "%Y"}
    if rule == "weekly":
        return weekly
    fmt = formats[rule]
    return lambda t: t.strftime(fmt)


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    time: str


def _item_period(of_time: Callable[[datetime.datetime], str]) -> Callable[[Item], str]:
    return lambda item: of_time(parse_time(item.time))


def select(items: Sequence[Item], keep: dict[str, int]) -> tuple[list[str], list[str]]:
    """``(kept ids, forgotten ids)``, newest first.  ``keep`` maps a rule of :data:`RULES` to N."""
    ordered = sorted(items, key=lambda i: (parse_time(i.time), i.id), reverse=True)
    marks: dict[str, bool] = {}
    for rule in RULES:
        count = keep.get(rule, 0)
        if count <= 0:
            continue
        # keep-last: every snapshot is its own period, even two taken at the same instant.
        period = (lambda i: i.id) if rule == "last" else _item_period(_period(rule))
        # Periods in which earlier rules already kept a snapshot are not this rule's to count.
        covered = {period(i) for i in ordered if marks.get(i.id)}
        chosen: set[str] = set()
        for item in ordered:
            if item.id in marks:
                continue
            key = period(item)
            if key in covered:
                continue
            if key not in chosen:
                if len(chosen) >= count:
                    break
                chosen.add(key)
                marks[item.id] = True
            else:
                marks[item.id] = False
    kept = [i.id for i in ordered if marks.get(i.id)]
    forgotten = [i.id for i in ordered if not marks.get(i.id)]
    return kept, forgotten
