"""Backups into S3 while the store misbehaves: radosgw killed (SIGKILL) mid-backup and started again,
and a proxy in front of radosgw that throttles (503 SlowDown), resets connections before and after
carrying out a request, and delays.  A backup either completes exactly (the restore compares equal) or
fails with nothing committed and a repository that verify finds clean and gc cleans up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .ceph_fixtures import Ceph
from .conftest import CliProcess, MiB, RunCli, StartCli, assert_same_content, random_file
from .s3_proxy import FaultProxy

DEADLINE = 60.0


@pytest.fixture
def repo_env(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COWBACKUP_PASSWORD", "correct horse")
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COWBACKUP_KEYS_DIR", str(tmp_path / "keys"))


@pytest.fixture
def gateway(ceph: Ceph) -> Iterator[Ceph]:
    """The cluster, with radosgw running again at the end of the test whatever it did to it."""
    try:
        yield ceph
    finally:
        if not _serving(ceph):
            ceph.start_gateway()


def _serving(ceph: Ceph) -> bool:
    pid_file = ceph.dir / "run" / "client.rgw.a.pid"
    try:
        return Path(f"/proc/{int(pid_file.read_text())}").exists()
    except (OSError, ValueError):
        return False


def _result(stdout: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return doc


def _wait_for_chunk_puts(proxy: FaultProxy, n: int, backup: CliProcess) -> None:
    deadline = time.monotonic() + DEADLINE
    while sum(1 for m, path in list(proxy.requests) if m == "PUT" and "/chunks/" in path) < n:
        assert backup.proc.poll() is None, f"the backup ended first: {backup.stderr()}"
        assert time.monotonic() < deadline, "the backup stored no chunks"
        time.sleep(0.01)  # polling the proxy's log, with a deadline


def _backup_until_chunks_are_stored(
    ceph: Ceph, proxy: FaultProxy, start_cli: StartCli, run_cli: RunCli, workdir: Path
) -> tuple[str, str, Path, CliProcess]:
    """A backup of 32 new chunks running through ``proxy``, once it has stored a few: (bucket,
    repository, disk, the backup).  Each chunk PUT waits 50 ms in the proxy, so that the backup lasts
    long enough to be hit mid-way."""
    bucket = ceph.new_bucket("kill")
    repo = f"s3://{bucket}/r"
    disk = random_file(workdir / "disk.img", 32 * MiB, seed=21)
    assert run_cli("repo", "init", repo, "--chunk-size", "1M").returncode == 0
    proxy.only, proxy.delay, proxy.delay_seconds = "/chunks/", 1.0, 0.05
    backup = start_cli(
        "backup", str(disk), "--repo", repo, "--name", "h/vm", "--json",
        "--endpoint-url", proxy.endpoint, "--repo-workers", "2",
    )  # fmt: skip
    _wait_for_chunk_puts(proxy, 6, backup)
    return bucket, repo, disk, backup


def test_gateway_killed_mid_backup_and_restarted(
    repo_env: None,
    gateway: Ceph,
    fault_proxy: FaultProxy,
    start_cli: StartCli,
    run_cli: RunCli,
    workdir: Path,
) -> None:
    _, repo, disk, backup = _backup_until_chunks_are_stored(gateway, fault_proxy, start_cli, run_cli, workdir)
    gateway.kill_gateway()
    time.sleep(1.0)  # the outage itself: the backup's requests fail meanwhile
    gateway.start_gateway()
    assert backup.finish() == 0, backup.stderr()
    result = _result(backup.stdout_lines[-1])
    requests = result["requests"]
    assert isinstance(requests, dict) and requests["retries"] > 0
    p = run_cli("restore", "--repo", repo, "latest", str(workdir / "out.img"))
    assert p.returncode == 0, p.stderr
    assert_same_content(disk, workdir / "out.img")
    p = run_cli("verify", "--repo", repo, "--read-data")
    assert p.returncode == 0, p.stdout + p.stderr


def test_gateway_down_past_the_retry_budget(
    repo_env: None,
    gateway: Ceph,
    fault_proxy: FaultProxy,
    start_cli: StartCli,
    run_cli: RunCli,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COWBACKUP_S3_RETRY_BUDGET", "1")
    bucket, repo, _, backup = _backup_until_chunks_are_stored(
        gateway, fault_proxy, start_cli, run_cli, workdir
    )
    gateway.kill_gateway()
    code = backup.finish()
    gateway.start_gateway()
    monkeypatch.delenv("COWBACKUP_S3_RETRY_BUDGET")
    assert code not in (0, 2), backup.stderr()
    assert "gave up after" in backup.stderr() and "internal error" not in backup.stderr(), backup.stderr()
    # Nothing committed; the chunks it stored are garbage that verify ignores and gc reclaims.
    assert gateway.keys(bucket, "r/snapshots/") == []
    assert gateway.keys(bucket, "r/chunks/") != []
    p = run_cli("verify", "--repo", repo, "--read-data")
    assert p.returncode == 0, p.stdout + p.stderr
    p = run_cli("gc", "--repo", repo, "--json")
    assert p.returncode == 0, p.stderr
    assert gateway.keys(bucket, "r/chunks/") == []
    assert gateway.keys(bucket, "r/sessions/") == []  # the dead backup's session went too


def test_throttling_resets_and_delays(
    repo_env: None, ceph: Ceph, fault_proxy: FaultProxy, run_cli: RunCli, workdir: Path
) -> None:
    repo = f"s3://{ceph.new_bucket('flaky')}/r"
    disk = random_file(workdir / "disk.img", 12 * MiB, seed=23)
    assert run_cli("repo", "init", repo, "--chunk-size", "1M").returncode == 0
    fault_proxy.slowdown, fault_proxy.reset_before, fault_proxy.reset_after = 0.1, 0.05, 0.05
    fault_proxy.delay, fault_proxy.delay_seconds = 0.1, 0.2
    via = ("--endpoint-url", fault_proxy.endpoint)
    p = run_cli("backup", str(disk), "--repo", repo, "--name", "h/vm", "--json", *via)
    assert p.returncode == 0, p.stderr
    result = _result(p.stdout)
    requests, stats = result["requests"], result["stats"]
    assert isinstance(requests, dict) and isinstance(stats, dict)
    failed = sum(n for fault, n in fault_proxy.injected.items() if fault != "delay")
    assert failed > 0
    # Every failed attempt was retried, and reported.
    assert requests["retries"] == failed, (requests, fault_proxy.faults)
    # A conditional PUT whose answer was lost and that then met a 412 knows the object as its own.
    assert stats["new_chunks"] == 12
    p = run_cli("restore", "--repo", repo, "latest", str(workdir / "out.img"), *via)
    assert p.returncode == 0, p.stderr
    assert_same_content(disk, workdir / "out.img")
    fault_proxy.slowdown = fault_proxy.reset_before = fault_proxy.reset_after = fault_proxy.delay = 0.0
    p = run_cli("verify", "--repo", repo, "--read-data")
    assert p.returncode == 0, p.stdout + p.stderr
