"""retention.select against Proxmox Backup Server's documented prune semantics.

Each scenario writes its snapshots out with explicit times (UTC) and the exact kept / forgotten sets, so
a reader can check them by hand against https://pbs.proxmox.com/docs/prune-simulator/ rules: newest per
period, periods without backups do not count, each rule only considers what earlier rules left.
"""

from __future__ import annotations

import pytest

from cowbackup.repo.retention import Item, select


def items(*times: str) -> list[Item]:
    """Snapshots named after their times (so expectations read as times)."""
    return [Item(t, t) for t in times]


def check(times: list[str], keep: dict[str, int], kept: list[str]) -> None:
    got_kept, got_forgotten = select(items(*times), keep)
    newest_first = sorted(times, reverse=True)
    assert got_kept == [t for t in newest_first if t in kept]
    assert got_forgotten == [t for t in newest_first if t not in kept]


def test_keep_last_then_daily_skips_days_already_kept() -> None:
    times = [
        "2026-03-03T20:00:00Z",
        "2026-03-03T08:00:00Z",
        "2026-03-02T20:00:00Z",
        "2026-03-02T08:00:00Z",
        "2026-03-01T12:00:00Z",
    ]
    # keep-last takes both of March 3rd; keep-daily then may not count March 3rd again: it keeps the
    # newest of March 2nd and of March 1st.
    check(
        times,
        {"last": 2, "daily": 2},
        ["2026-03-03T20:00:00Z", "2026-03-03T08:00:00Z", "2026-03-02T20:00:00Z", "2026-03-01T12:00:00Z"],
    )


def test_daily_keeps_the_newest_of_each_day() -> None:
    times = ["2026-03-02T23:59:59Z", "2026-03-02T00:00:00Z", "2026-03-01T10:00:00Z", "2026-03-01T09:00:00Z"]
    check(times, {"daily": 5}, ["2026-03-02T23:59:59Z", "2026-03-01T10:00:00Z"])


def test_periods_without_backups_do_not_count() -> None:
    # Three days with backups spread over three weeks: keep-daily=2 keeps two *days that have backups*,
    # not "the last two calendar days" (which would keep only the newest).
    times = ["2026-01-20T12:00:00Z", "2026-01-05T12:00:00Z", "2026-01-01T12:00:00Z"]
    check(times, {"daily": 2}, ["2026-01-20T12:00:00Z", "2026-01-05T12:00:00Z"])


def test_iso_weeks_across_a_year_boundary() -> None:
    # 2024-12-30 (Monday) .. 2025-01-05 (Sunday) is ISO week 2025-W01; 2024-12-29 (Sunday) is 2024-W52.
    times = ["2025-01-05T10:00:00Z", "2024-12-31T10:00:00Z", "2024-12-30T10:00:00Z", "2024-12-29T10:00:00Z"]
    check(times, {"weekly": 2}, ["2025-01-05T10:00:00Z", "2024-12-29T10:00:00Z"])
    # By calendar year, the same snapshots fall in 2025 and 2024.
    check(times, {"yearly": 2}, ["2025-01-05T10:00:00Z", "2024-12-31T10:00:00Z"])


def test_weekly_after_daily_counts_only_weeks_daily_left() -> None:
    times = [
        "2026-03-11T12:00:00Z",  # Wed, ISO week 11
        "2026-03-10T12:00:00Z",  # Tue, week 11
        "2026-03-06T12:00:00Z",  # Fri, week 10
        "2026-03-04T12:00:00Z",  # Wed, week 10
        "2026-02-25T12:00:00Z",  # Wed, week 9
        "2026-02-18T12:00:00Z",  # Wed, week 8
    ]
    # daily keeps March 11th; weekly may not count week 11 again, so it keeps the newest of week 10 and
    # week 9; February 18th (week 8) is a third week: forgotten.
    check(
        times,
        {"daily": 1, "weekly": 2},
        ["2026-03-11T12:00:00Z", "2026-03-06T12:00:00Z", "2026-02-25T12:00:00Z"],
    )


def test_hourly_monthly_and_yearly_chain() -> None:
    times = [
        "2026-05-01T10:30:00Z",
        "2026-05-01T10:10:00Z",
        "2026-05-01T09:00:00Z",
        "2026-04-15T00:00:00Z",
        "2026-04-01T00:00:00Z",
        "2025-12-31T23:00:00Z",
        "2025-06-01T00:00:00Z",
        "2024-01-01T00:00:00Z",
    ]
    check(
        times,
        {"hourly": 2, "monthly": 2, "yearly": 2},
        [
            "2026-05-01T10:30:00Z",  # hourly: 10h
            "2026-05-01T09:00:00Z",  # hourly: 9h
            "2026-04-15T00:00:00Z",  # monthly: April (May is covered by hourly)
            "2025-12-31T23:00:00Z",  # monthly: December 2025
            "2024-01-01T00:00:00Z",  # yearly: 2026 and 2025 are covered, 2024 is next
        ],
    )


def test_keep_last_counts_snapshots_even_at_one_instant() -> None:
    # Two backups of one name finishing in the same millisecond are still two snapshots.
    same = "2026-03-01T12:00:00.000Z"
    kept, forgotten = select(
        [Item("a" * 32, same), Item("b" * 32, same), Item("c" * 32, "2026-02-01T00:00:00Z")], {"last": 2}
    )
    assert sorted(kept) == ["a" * 32, "b" * 32]
    assert forgotten == ["c" * 32]


def test_no_rule_keeps_nothing_and_empty_input() -> None:
    # The CLI refuses an empty policy; the pure function says what it means: nothing is kept.
    assert select(items("2026-01-01T00:00:00Z"), {}) == ([], ["2026-01-01T00:00:00Z"])
    assert select([], {"last": 3}) == ([], [])


@pytest.mark.parametrize("rule", ["last", "hourly", "daily", "weekly", "monthly", "yearly"])
def test_enough_periods_keep_everything_newest_per_period(rule: str) -> None:
    # One snapshot per year: every period of every rule holds exactly one, so N = count keeps all.
    times = [f"{2000 + y}-06-15T12:00:00Z" for y in range(6)]
    check(times, {rule: 6}, times)
    check(times, {rule: 2}, times[-2:])
