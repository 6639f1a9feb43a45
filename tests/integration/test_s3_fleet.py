"""A fleet on one S3 repository: four hosts back up at once (each process with its own chunk cache; two
of them share most of their data) while ``forget --keep-last 1`` and ``gc`` run in a loop, for a few
rounds.  Then every snapshot left restores exactly, ``verify --read-data`` is clean, and the store holds
each distinct chunk of those snapshots exactly once (the dedup across hosts, and gc's cleaning).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path

import pytest

from .ceph_fixtures import Ceph
from .conftest import CLI_TIMEOUT, MiB, RunCli, assert_same_content, cli_command, cli_env

HOSTS = ("h1/vm", "h2/vm", "h3/vm", "h4/vm")
#: Each round is ~15 s here (a dozen cowbackup processes on a loaded 2-core machine).
ROUNDS = 2
CHUNK = 1 * MiB


def _disks(workdir: Path) -> dict[str, bytearray]:
    rng = random.Random(77)
    shared = rng.randbytes(6 * MiB)
    return {
        "h1/vm": bytearray(shared + rng.randbytes(2 * MiB)),
        "h2/vm": bytearray(shared + rng.randbytes(2 * MiB)),
        "h3/vm": bytearray(rng.randbytes(4 * MiB)),
        "h4/vm": bytearray(rng.randbytes(3 * MiB) + bytes(MiB)),
    }


def _chunks(contents: bytes) -> set[bytes]:
    """The distinct non-zero chunks of a disk, by digest."""
    pieces = (contents[i : i + CHUNK] for i in range(0, len(contents), CHUNK))
    return {hashlib.sha256(p).digest() for p in pieces if p.count(0) != len(p)}


def test_four_hosts_forget_and_gc_at_once(
    s3_env: dict[str, str],
    ceph: Ceph,
    run_cli: RunCli,
    workdir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = ceph.new_bucket("fleet")
    repo = f"s3://{bucket}/fleet"
    base_env = {**cli_env(), "COWBACKUP_PASSWORD": "fleet", "COWBACKUP_KEYS_DIR": str(tmp_path / "keys")}
    for name in ("COWBACKUP_PASSWORD", "COWBACKUP_KEYS_DIR"):
        monkeypatch.setenv(name, base_env[name])
    monkeypatch.setenv("COWBACKUP_CACHE_DIR", str(tmp_path / "cache-tests"))
    assert run_cli("repo", "init", repo, "--chunk-size", "1M").returncode == 0
    disks = _disks(workdir)
    rng = random.Random(5)
    committed: dict[str, bytes] = {}  # snapshot id -> contents
    for round_ in range(ROUNDS):
        backups = {}
        for n, (host, contents) in enumerate(disks.items()):
            if round_:  # each host's disk changes a little between rounds
                at = rng.randrange(len(contents) // CHUNK) * CHUNK
                contents[at : at + 4096] = rng.randbytes(4096)
            path = workdir / f"disk{n}.img"
            path.write_bytes(contents)
            env = {**base_env, "COWBACKUP_CACHE_DIR": str(tmp_path / f"cache-{n}")}
            backups[host] = (
                bytes(contents),
                subprocess.Popen(
                    cli_command("backup", str(path), "--repo", repo, "--name", host, "--json"),
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir,
                ),
            )  # fmt: skip
        try:
            # forget and gc, again and again while the backups run
            cleaners = 0
            while cleaners < 2 or any(p.poll() is None for _, p in backups.values()):
                p = run_cli("forget", "--repo", repo, "--keep-last", "1")
                assert p.returncode == 0, p.stderr
                p = run_cli("gc", "--repo", repo, "--json")
                assert p.returncode == 0, p.stderr
                cleaners += 1
            for host, (taken, proc) in backups.items():
                stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT)
                assert proc.returncode == 0, f"{host}: {stderr}"
                committed[json.loads(stdout.strip().splitlines()[-1])["snapshot"]] = taken
        finally:
            for _, proc in backups.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=CLI_TIMEOUT)
    p = run_cli("forget", "--repo", repo, "--keep-last", "1")
    assert p.returncode == 0, p.stderr
    p = run_cli("gc", "--repo", repo)
    assert p.returncode == 0, p.stderr
    p = run_cli("snapshots", "--repo", repo, "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert sorted(r["name"] for r in rows) == sorted(HOSTS)  # the last of each host
    for row in rows:
        restored = workdir / f"restored-{row['id']}.img"
        q = run_cli("restore", "--repo", repo, row["id"], str(restored))
        assert q.returncode == 0, q.stderr
        expected = workdir / "expected.img"
        expected.write_bytes(committed[row["id"]])
        assert_same_content(expected, restored)
        restored.unlink()
    p = run_cli("verify", "--repo", repo, "--read-data", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    # Dedup: one object per distinct chunk of the snapshots kept, whoever stored it first.
    wanted: set[bytes] = set().union(*(_chunks(committed[row["id"]]) for row in rows))
    assert len(ceph.keys(bucket, "fleet/chunks/")) == len(wanted)
