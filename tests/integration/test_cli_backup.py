"""The ``cowbackup`` command, run as a subprocess on real image files.

What a user sees: exit codes (0/1/2/130, see :mod:`cowbackup.cli.errors`), one-line errors, ``--json``
output, and targets that are byte-identical to the source and as sparse as the source's data.  Speed is
not asserted here (a benchmark measures it); the speed-limited run prints its time only.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import cowbackup

from .conftest import (
    Image,
    KiB,
    MiB,
    RunCli,
    SegmentKind,
    StartCli,
    allocated,
    assert_same_content,
    build_image,
    layout,
    mapped_data,
    qemu_img_compare,
    random_file,
)

pytestmark = pytest.mark.usefixtures("need_qemu_img")

#: A 16 MiB group of data, explicit zero runs and holes, repeated.  Zero runs sit between holes: they are
#: extents of their own in the source, so a copy that skips zeros leaves them unallocated.
SPARSE_PATTERN: list[tuple[int, SegmentKind]] = [
    (4 * MiB, "data"),
    (1 * MiB, "hole"),
    (4 * MiB, "zero"),
    (512 * KiB, "hole"),
    (256 * KiB, "data"),
    (256 * KiB, "hole"),
    (1 * MiB, "zero"),
    (2 * MiB, "hole"),
    (1 * MiB, "data"),
    (2 * MiB, "hole"),
]

#: Zero runs right after data, inside one allocated extent of the source (like cowbackup demo's disk).
MIXED_PATTERN: list[tuple[int, SegmentKind]] = [
    (1 * MiB, "data"),
    (1 * MiB, "zero"),
    (512 * KiB, "hole"),
    (256 * KiB, "data"),
    (256 * KiB, "zero"),
    (1 * MiB, "hole"),
]


@pytest.fixture(scope="module")
def sparse_image(module_workdir: Path) -> Image:
    """128 MiB: 42 MiB of data, 40 MiB of written zeros, the rest holes.  Read-only for the tests."""
    return build_image(module_workdir / "sparse.img", 128 * MiB, layout(128 * MiB, SPARSE_PATTERN), seed=1)


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line parsed as one JSON object (fails on anything else)."""
    records: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        records.append(record)
    return records


def check_json_run(records: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """A completed ``--json`` run's lines are well-formed and consistent; return the result record."""
    assert {r["type"] for r in records} <= {"start", "progress", "event", "result"}
    assert records[0]["type"] == "start"
    assert records[0]["total"] == size
    assert records[-1]["type"] == "result"
    assert [r["type"] for r in records].count("result") == 1

    progress = [r for r in records if r["type"] == "progress"]
    assert progress, "no progress line"
    currents = [p["current"] for p in progress]
    assert currents == sorted(currents), f"progress went backwards: {currents}"
    for p in progress:
        assert p["job"] == records[0]["job"]
        assert p["total"] == size  # sync=full: the total never changes
        assert 0 <= p["current"] <= p["total"]
        assert p["rate"] >= 0
    assert currents[-1] == size, "the last progress line is not the final sample"

    events = [r for r in records if r["type"] == "event"]
    assert all(isinstance(e["event"], str) and isinstance(e["data"], dict) for e in events)
    names = [e["event"] for e in events]
    assert names.count("BLOCK_JOB_COMPLETED") == 1
    assert "BLOCK_JOB_CANCELLED" not in names
    completed = next(e["data"] for e in events if e["event"] == "BLOCK_JOB_COMPLETED")
    assert completed["type"] == "backup"
    assert completed["len"] == completed["offset"] == size
    assert "error" not in completed
    statuses = [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE"]
    assert statuses[:2] == ["created", "running"]
    assert statuses[-2:] == ["concluded", "null"]

    result = records[-1]
    assert result["bytes"] == size
    assert result["seconds"] > 0
    assert result["rate"] > 0
    return result


def single_line(stderr: str) -> str:
    """The only line on stderr (a one-line error or summary, no traceback)."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("cowbackup: ")
    return lines[0]


def covered(ranges: list[tuple[int, int]], allowed: list[tuple[int, int]]) -> bool:
    """Every ``(start, end)`` of ``ranges`` lies inside one of ``allowed`` (sorted, merged)."""
    return all(any(a <= start and end <= b for a, b in allowed) for start, end in ranges)


# ---------------------------------------------------------------------------------------------- success


def test_backup_is_identical_and_sparse(run_cli: RunCli, workdir: Path, sparse_image: Image) -> None:
    src, tgt = sparse_image.path, workdir / "backup.img"
    zero_bytes = sum(s.length for s in sparse_image.segments if s.kind == "zero")
    # The source really allocates its zero runs, or this test could not tell zeros from holes.
    assert allocated(src) >= sparse_image.data_bytes + zero_bytes

    proc = run_cli("backup", str(src), str(tgt))

    assert proc.returncode == 0, proc.stderr
    assert single_line(proc.stderr).startswith("cowbackup: backed up 128.0 MiB")
    assert os.path.getsize(tgt) == sparse_image.size  # absent target: created with the source's size
    qemu_img_compare(src, tgt)
    assert_same_content(src, tgt)
    # Sparse: nothing but the source's data is allocated -- not its zero runs, not its holes.
    assert allocated(tgt) <= sparse_image.data_bytes
    data = mapped_data(tgt)
    assert sum(end - start for start, end in data) <= sparse_image.data_bytes
    assert covered(data, sparse_image.data_ranges()), f"target maps data outside the source's data: {data}"


def test_zero_runs_next_to_data_stay_sparse(run_cli: RunCli, workdir: Path) -> None:
    src = build_image(workdir / "mixed.img", 32 * MiB, layout(32 * MiB, MIXED_PATTERN), seed=2)
    tgt = workdir / "backup.img"

    proc = run_cli("backup", str(src.path), str(tgt))

    assert proc.returncode == 0, proc.stderr
    assert_same_content(src.path, tgt)
    assert allocated(tgt) <= src.data_bytes


def test_small_max_chunk_finds_zero_runs_next_to_data(run_cli: RunCli, workdir: Path) -> None:
    """With one cluster per copy, every zero cluster is seen as zero, wherever it sits."""
    src = build_image(workdir / "mixed.img", 32 * MiB, layout(32 * MiB, MIXED_PATTERN), seed=2)
    tgt = workdir / "backup.img"

    proc = run_cli("backup", "--max-chunk", "64K", str(src.path), str(tgt))

    assert proc.returncode == 0, proc.stderr
    qemu_img_compare(src.path, tgt)
    assert_same_content(src.path, tgt)
    assert allocated(tgt) <= src.data_bytes
    assert covered(mapped_data(tgt), src.data_ranges())


def test_odd_size_source(run_cli: RunCli, workdir: Path) -> None:
    """A size that is no multiple of the cluster (nor of 512): the last partial cluster is copied too."""
    size = 3 * MiB + 4096 + 123
    src = random_file(workdir / "odd.img", size, seed=3)
    tgt = workdir / "backup.img"

    proc = run_cli("backup", str(src), str(tgt))

    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(tgt) == size
    assert_same_content(src, tgt)


def test_json_output(run_cli: RunCli, workdir: Path, sparse_image: Image) -> None:
    tgt = workdir / "backup.img"

    proc = run_cli("backup", "--json", str(sparse_image.path), str(tgt))

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # with --json everything goes to stdout, as JSON
    result = check_json_run(json_lines(proc.stdout), sparse_image.size)
    assert result["allocated"] == allocated(tgt)
    assert_same_content(sparse_image.path, tgt)


def test_speed_limited_json_progress(run_cli: RunCli, workdir: Path) -> None:
    """The issue's acceptance run: 48 MiB at --speed 16M ("about 3 s").  Its time is printed, not asserted."""
    size = 48 * MiB
    src = random_file(workdir / "random.img", size, seed=4)
    tgt = workdir / "backup.img"

    started = time.monotonic()
    proc = run_cli("backup", "--json", "--speed", "16M", str(src), str(tgt))
    wall = time.monotonic() - started

    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stdout)
    result = check_json_run(records, size)
    completed = next(r["data"] for r in records if r.get("event") == "BLOCK_JOB_COMPLETED")
    assert completed["speed"] == 16 * MiB
    assert_same_content(src, tgt)
    progress = sum(r["type"] == "progress" for r in records)
    print(
        f"48 MiB at --speed 16M: job {result['seconds']:.2f} s, command {wall:.2f} s, "
        f"{result['rate'] / MiB:.1f} MiB/s, {progress} progress lines"
    )


@pytest.mark.parametrize("sync", ["full", "top"])
def test_sync_modes_on_raw(run_cli: RunCli, workdir: Path, sparse_image: Image, sync: str) -> None:
    """On a raw image every block is in the top layer: ``top`` copies what ``full`` copies."""
    tgt = workdir / "backup.img"

    proc = run_cli("backup", "--sync", sync, str(sparse_image.path), str(tgt))

    assert proc.returncode == 0, proc.stderr
    qemu_img_compare(sparse_image.path, tgt)
    assert_same_content(sparse_image.path, tgt)
    assert allocated(tgt) <= sparse_image.data_bytes


def test_copy_range(run_cli: RunCli, workdir: Path, sparse_image: Image) -> None:
    tgt = workdir / "backup.img"

    proc = run_cli("backup", "--copy-range", str(sparse_image.path), str(tgt))

    assert proc.returncode == 0, proc.stderr
    qemu_img_compare(sparse_image.path, tgt)
    assert_same_content(sparse_image.path, tgt)


# ---------------------------------------------------------------------------------------------- targets


def test_existing_target_needs_force(run_cli: RunCli, workdir: Path) -> None:
    src = random_file(workdir / "src.img", 2 * MiB, seed=5)
    tgt = random_file(workdir / "backup.img", 3 * MiB, seed=6)
    before = tgt.read_bytes()

    proc = run_cli("backup", str(src), str(tgt))

    assert proc.returncode == 2
    assert "--force" in single_line(proc.stderr)
    assert proc.stdout == ""
    assert tgt.read_bytes() == before


def test_force_overwrites_target_exactly(run_cli: RunCli, workdir: Path) -> None:
    """A larger target full of other data becomes an exact copy, cut to the source's size."""
    src = build_image(workdir / "src.img", 16 * MiB, layout(16 * MiB, SPARSE_PATTERN), seed=7)
    tgt = random_file(workdir / "backup.img", 20 * MiB, seed=8)

    proc = run_cli("backup", "--force", str(src.path), str(tgt))

    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(tgt) == src.size
    qemu_img_compare(src.path, tgt)
    assert_same_content(src.path, tgt)
    assert allocated(tgt) <= src.data_bytes  # the old data is gone, not just overwritten


def test_empty_target_is_used_without_force(run_cli: RunCli, workdir: Path) -> None:
    src = random_file(workdir / "src.img", 2 * MiB, seed=9)
    tgt = workdir / "backup.img"
    tgt.touch()

    proc = run_cli("backup", str(src), str(tgt))

    assert proc.returncode == 0, proc.stderr
    assert_same_content(src, tgt)


# ---------------------------------------------------------------------------------------------- usage


@pytest.mark.parametrize(
    ("args", "message", "usage"),
    [
        pytest.param(
            ["missing.img", "backup.img"], "source 'missing.img' does not exist", False, id="no-source"
        ),
        pytest.param(["--speed", "abc", "src.img", "backup.img"], "invalid size 'abc'", True, id="bad-speed"),
        pytest.param(
            ["--cluster-size", "1000", "src.img", "backup.img"], "--cluster-size must be", False, id="cluster"
        ),
        pytest.param(
            ["--sync", "none", "src.img", "backup.img"], "invalid choice: 'none'", True, id="sync-none"
        ),
        pytest.param(["--workers", "0", "src.img", "backup.img"], "must be at least 1", True, id="workers"),
        pytest.param(["src.img", "./src.img"], "source and target are the same file", False, id="same-file"),
        pytest.param(
            ["src.img", "."], "is neither a regular file nor a block device", False, id="target-dir"
        ),
    ],
)
def test_usage_errors(run_cli: RunCli, workdir: Path, args: list[str], message: str, usage: bool) -> None:
    src = random_file(workdir / "src.img", 1 * MiB, seed=10)
    before = src.read_bytes()

    proc = run_cli("backup", *args)

    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    if usage:
        assert lines[0].startswith("usage: cowbackup backup")
    else:
        single_line(proc.stderr)
    assert lines[-1].startswith("cowbackup: ")
    assert message in lines[-1]
    assert not (workdir / "backup.img").exists()
    assert src.read_bytes() == before


def test_version(run_cli: RunCli) -> None:
    proc = run_cli("--version")

    assert proc.returncode == 0
    assert proc.stdout.strip() == f"cowbackup {cowbackup.__version__}"


def test_no_command_prints_help(run_cli: RunCli) -> None:
    proc = run_cli()

    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: cowbackup")
    assert "backup" in proc.stderr
    assert "demo" in proc.stderr


# ---------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_cancels_backup(
    start_cli: StartCli, workdir: Path, sparse_image: Image, signum: signal.Signals
) -> None:
    """Ctrl-C (or SIGTERM) mid-backup: the job is cancelled, one line on stderr, exit 130."""
    tgt = workdir / "backup.img"
    # 1 MiB/s on 128 MiB: minutes of work, so the signal surely lands while the job runs.
    cli = start_cli("backup", "--json", "--speed", "1M", str(sparse_image.path), str(tgt))
    cli.wait_line(lambda line: json.loads(line)["type"] == "progress")

    sent = time.monotonic()
    cli.proc.send_signal(signum)
    code = cli.finish()
    print(f"{signum.name}: exit {time.monotonic() - sent:.2f} s after the signal")

    stderr = cli.stderr()
    assert code == 130, stderr
    line = single_line(stderr)
    assert line.startswith("cowbackup: interrupted")
    assert signum.name in line
    records = json_lines("\n".join(cli.stdout_lines))
    names = [r["event"] for r in records if r["type"] == "event"]
    assert "BLOCK_JOB_CANCELLED" in names
    assert "BLOCK_JOB_COMPLETED" not in names
    assert all(r["type"] != "result" for r in records)


# ---------------------------------------------------------------------------------------------- demo


def test_demo(run_cli: RunCli, workdir: Path) -> None:
    proc = run_cli("demo", "--size", "32M", "--seed", "1", "--dir", str(workdir))

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for check in ("backup == disk at start", "disk holds every write"):
        rows = [line for line in proc.stderr.splitlines() if check in line]
        assert len(rows) == 1, proc.stderr
        assert "yes" in rows[0]
        assert "NO" not in rows[0]
    # The repository part: a full and an incremental live backup, each restoring to its instant.
    assert proc.stderr.count("restores to the disk at its instant") == 2, proc.stderr
    assert "(incremental)" in proc.stderr and "DIFFERS" not in proc.stderr
    assert any("verify --read-data" in line and "clean" in line for line in proc.stderr.splitlines())
    assert os.listdir(workdir) == []  # the demo removed its images
