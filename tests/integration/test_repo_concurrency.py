"""Four ``cowbackup backup --repo`` processes into one repository at once, ``forget`` and ``gc`` alongside.

Two of the four disks share most of their data (they race to store the same chunks); ``forget
--keep-last 1`` and ``gc`` run in a loop while the backups run, so gc condemns and sweeps chunks that
backups are finding already stored.  Every backup must succeed, and afterwards every snapshot restores
exactly, ``verify --read-data`` is clean, and a final gc leaves exactly what the snapshots reference.
"""

from __future__ import annotations

import random
import subprocess
import threading
from pathlib import Path

import pytest

from .conftest import CLI_TIMEOUT, KiB, MiB
from .repo_helpers import RepoCli, file_sha256, referenced_objects, repo_objects, rewrite_chunks, temp_files

pytestmark = pytest.mark.usefixtures("need_qemu_img")

CHUNK = 64 * KiB
DISK = 8 * MiB
ROUNDS = 3


def mutate(data: bytes, rng: random.Random, fraction: float) -> bytes:
    return rewrite_chunks(data, rng, fraction, CHUNK)


class Housekeeping:
    """``forget --keep-last 1`` and ``gc`` in turn, in a thread, until stopped; every run must succeed."""

    def __init__(self, cli: RepoCli) -> None:
        self.cli = cli
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.runs = 0
        self.thread = threading.Thread(target=self._loop, name="housekeeping", daemon=True)

    def _loop(self) -> None:
        commands = (["forget", "--keep-last", "1"], ["gc"])
        # At least one forget and one gc per round, even when the backups end first.
        while not (self.stop.is_set() and self.runs >= 2):
            args = commands[self.runs % 2]
            proc = self.cli.run(*args, "--repo", str(self.cli.repo))
            self.runs += 1
            if proc.returncode != 0:
                self.failures.append(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr}")

    def __enter__(self) -> Housekeeping:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(CLI_TIMEOUT)


@pytest.mark.slow
def test_four_backups_with_forget_and_gc_alongside(workdir: Path) -> None:
    cli = RepoCli(workdir, workdir / "repo")
    cli.init("--chunk-size", "64K")
    rng = random.Random(4)
    disks = {name: rng.randbytes(DISK) for name in ("a", "c", "d")}
    disks["b"] = mutate(disks["a"], rng, 0.1)  # b shares 90% of its chunks with a
    digests: dict[str, str] = {}  # tag -> SHA-256 of what was backed up under it

    for round_ in range(ROUNDS):
        sources = {}
        for name, data in sorted(disks.items()):
            path = workdir / f"{name}.img"
            path.write_bytes(data)
            tag = f"r{round_}-{name}"
            digests[tag] = file_sha256(path)
            sources[name] = (path, tag)
        with Housekeeping(cli) as housekeeping:
            procs = {
                name: cli.start(
                    "backup", str(path), "--repo", str(cli.repo), "--name", f"vm-{name}", "--tag", tag
                )
                for name, (path, tag) in sources.items()
            }
            for name, proc in procs.items():
                try:
                    _out, err = proc.communicate(timeout=CLI_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    pytest.fail(f"backup of {name} hung")
                assert proc.returncode == 0, f"round {round_}, backup of {name}: {err}"
        assert not housekeeping.failures, housekeeping.failures

        # Every snapshot listed is one of ours; this round's four are all there unless a forget
        # that ran after them kept only the newest of each name, which is this round's.
        rows = cli.snapshots()
        tags = [row["tags"][0] for row in rows]
        assert set(tags) <= digests.keys()
        for name in sources:
            assert f"r{round_}-{name}" in tags, f"round {round_}: the snapshot of {name} is gone"

        # The next round: a and b change a little and keep sharing, c changes a lot, d not at all.
        shared = mutate(disks["a"], rng, 0.1)
        disks["a"], disks["b"] = shared, mutate(shared, rng, 0.05)
        disks["c"] = mutate(disks["c"], rng, 0.5)

    for row in cli.snapshots():
        cli.assert_restores(row["id"], digests[row["tags"][0]], workdir / "check.img")
    code, report = cli.verify("--read-data", "--no-repair")
    assert code == 0 and report["ok"], report
    cli.gc()
    assert repo_objects(cli.repo) == referenced_objects(cli.repo)
    assert temp_files(cli.repo) == []
    assert not list((cli.repo / "sessions").glob("*"))
