"""The deterministic gc/backup interleavings of ``tests/unit/repo/test_gc_interleave.py``, run again with
the repositories on S3 (Ceph's RADOS Gateway): whole-second store times, conditional PUTs, paginated
listings.  The tests are that module's own, imported here; only the store they run on changes (its
``new_store`` fixture is overridden below).  Of the placements of a backup's phases among gc's steps,
one per slot of the backup's start runs here (each costs a few hundred requests).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowbackup.repo.store import Store
from cowbackup.repo.store_s3 import S3Store

from .ceph_fixtures import Ceph

# The unit tests' directory is a package named ``repo`` on pytest's path (rootdir-relative, prepend
# import mode); make it importable however this module is collected.
_UNIT = str(Path(__file__).resolve().parents[1] / "unit")
if _UNIT not in sys.path:
    sys.path.append(_UNIT)

from repo.test_gc_interleave import (  # noqa: E402
    PLACEMENTS,
    SLOTS,
    NewStore,
    Template,
    copy_of,
    interleave,
    template,
    test_a_backup_starting_during_a_sweep_waits_for_it,
    test_a_dead_session_does_not_block_sweeping,
    test_two_backups_in_a_row_and_a_later_gc_sweeps_the_postponed_record,
)

__all__ = [
    "template",
    "test_a_backup_starting_during_a_sweep_waits_for_it",
    "test_a_dead_session_does_not_block_sweeping",
    "test_two_backups_in_a_row_and_a_later_gc_sweeps_the_postponed_record",
]


def spread() -> list[dict[str, str]]:
    """One placement per slot of the backup's start, the middle one of that slot's list (its other
    phases spread over gc's later steps)."""
    chosen = []
    for slot in SLOTS:
        cases = [p for p in PLACEMENTS if p["start"] == slot]
        chosen.append(cases[len(cases) // 2])
    return chosen


@pytest.mark.parametrize(
    "placement", spread(), ids=lambda p: "-".join(p[phase] for phase in ("start", "write_disk", "commit"))
)
def test_a_spread_of_placements(template: Template, new_store: NewStore, placement: dict[str, str]) -> None:
    # Without the cache every other time: then the backup finds D by a conditional PUT that fails.
    use_cache = SLOTS.index(placement["start"]) % 2 == 0
    interleave(copy_of(template, new_store("repo")), template.old, placement, use_cache=use_cache)


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COWBACKUP_KEYS_DIR", str(tmp_path / "keys"))


@pytest.fixture(scope="module")
def races_bucket(ceph: Ceph) -> str:
    return ceph.new_bucket("races")


@pytest.fixture
def new_store(s3_env: dict[str, str], races_bucket: str) -> Iterator[NewStore]:
    opened: list[Store] = []
    test_prefix = uuid.uuid4().hex[:12]

    def make(name: str) -> Store:
        store = S3Store(f"s3://{races_bucket}/{test_prefix}/{name}", max_connections=8)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
