"""Helpers for the process-level tests of the repository commands (``repo``, ``backup --repo``, ...).

* :class:`RepoCli` runs ``cowbackup`` against one repository with a test environment: a passphrase in
  ``COWBACKUP_PASSWORD``, and ``COWBACKUP_CACHE_DIR`` / ``COWBACKUP_KEYS_DIR`` in the test's directory
  (never the real ``~/.cache`` or ``~/.config``).
* :func:`referenced_objects` reads, independently of ``cowbackup.repo``, which chunk, index and refs
  objects the committed snapshots need (manifests are plain JSON; refs segments are never encrypted), so
  a test can compare it with what the repository holds after a gc.
* :func:`tree_state` fingerprints a directory (names, sizes, contents) to show that a command wrote
  nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .conftest import CLI_TIMEOUT, cli_command, cli_env

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

PASSWORD = "correct horse"

#: The object kinds gc manages (``docs/repository.md``): everything else is metadata.
GARBAGE_PREFIXES = ("chunks/", "index/", "refs/")


def rewrite_chunks(data: bytes, rng: random.Random, fraction: float, chunk: int) -> bytes:
    """``data`` with a ``fraction`` of its ``chunk``-sized pieces rewritten with new random bytes."""
    out = bytearray(data)
    chunks = len(out) // chunk
    for i in rng.sample(range(chunks), int(chunks * fraction)):
        out[i * chunk : (i + 1) * chunk] = rng.randbytes(chunk)
    return bytes(out)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class RepoCli:
    """``cowbackup`` commands against the repository ``repo``, run from ``workdir``."""

    def __init__(self, workdir: Path, repo: Path, password: str | None = PASSWORD) -> None:
        self.workdir = workdir
        self.repo = repo
        self.password = password
        self.cache_dir = workdir / "cache"
        self.keys_dir = workdir / "keys"

    def env(self, password: str | None = None, **extra: str) -> dict[str, str]:
        env = cli_env()
        for name in ("COWBACKUP_PASSWORD", "COWBACKUP_NEW_PASSWORD"):
            env.pop(name, None)
        pw = self.password if password is None else password
        if pw:
            env["COWBACKUP_PASSWORD"] = pw
        env["COWBACKUP_CACHE_DIR"] = str(self.cache_dir)
        env["COWBACKUP_KEYS_DIR"] = str(self.keys_dir)
        env.update(extra)
        return env

    def run(
        self,
        *args: str,
        password: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = CLI_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """``cowbackup ARGS`` to completion; stdin is /dev/null (no terminal to prompt on)."""
        return subprocess.run(
            cli_command(*args),
            cwd=self.workdir,
            env=dict(env) if env is not None else self.env(password),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Like :meth:`run`, and the command must succeed."""
        proc = self.run(*args, **kwargs)
        assert proc.returncode == 0, f"cowbackup {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}"
        return proc

    def start(self, *args: str, password: str | None = None) -> subprocess.Popen[str]:
        """``cowbackup ARGS`` in the background (the caller kills or waits for it)."""
        return subprocess.Popen(
            cli_command(*args),
            cwd=self.workdir,
            env=self.env(password),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # -- the commands tests use most ------------------------------------------------------------

    def init(self, *extra: str) -> dict[str, Any]:
        proc = self.ok("repo", "init", str(self.repo), "--json", *extra)
        info: dict[str, Any] = json.loads(proc.stdout)
        return info

    def backup(self, source: Path | str, name: str, *extra: str) -> str:
        """Back up ``source``; the new snapshot's id (from the ``--json`` result line)."""
        proc = self.ok("backup", str(source), "--repo", str(self.repo), "--name", name, "--json", *extra)
        result = json.loads(proc.stdout.splitlines()[-1])
        assert result["type"] == "result", proc.stdout
        sid: str = result["snapshot"]
        return sid

    def snapshots(self, *extra: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(
            self.ok("snapshots", "--repo", str(self.repo), "--json", *extra).stdout
        )
        return rows

    def restore(self, snapshot: str, target: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("restore", "--repo", str(self.repo), snapshot, str(target), *extra)

    def verify(self, *extra: str, password: str | None = None) -> tuple[int, dict[str, Any]]:
        proc = self.run("verify", "--repo", str(self.repo), "--json", *extra, password=password)
        assert proc.returncode in (0, 1), proc.stderr
        report: dict[str, Any] = json.loads(proc.stdout)
        return proc.returncode, report

    def gc(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.ok("gc", "--repo", str(self.repo), "--json").stdout)
        return out

    def assert_restores(self, snapshot: str, expected_sha256: str, target: Path) -> None:
        """Restore ``snapshot`` to a fresh raw file and compare its digest; the file is removed."""
        target.unlink(missing_ok=True)
        proc = self.restore(snapshot, target)
        assert proc.returncode == 0, f"restore {snapshot}: exit {proc.returncode}\n{proc.stderr}"
        try:
            assert file_sha256(target) == expected_sha256, f"snapshot {snapshot} restores different bytes"
        finally:
            target.unlink()


# ---------------------------------------------------------------------------------------------- the store


def repo_objects(repo: Path, prefixes: tuple[str, ...] = GARBAGE_PREFIXES) -> set[str]:
    """Names of the objects under ``prefixes`` (what a store listing shows: no dot files)."""
    found = set()
    for prefix in prefixes:
        top = repo / prefix
        for dirpath, _dirs, files in os.walk(top):
            for f in files:
                if not f.startswith("."):
                    found.add(os.path.relpath(os.path.join(dirpath, f), repo))
    return found


def temp_files(repo: Path) -> list[str]:
    """Leftover temporary files of interrupted writes (``.tmp-*`` anywhere in the repository)."""
    return sorted(
        os.path.relpath(os.path.join(d, f), repo)
        for d, _dirs, files in os.walk(repo)
        for f in files
        if f.startswith(".tmp")
    )


def repo_bytes(repo: Path) -> int:
    """Bytes the repository's files take (their sizes, summed)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _dirs, files in os.walk(repo) for f in files)


def _object_name(kind: str, hex_id: str) -> str:
    return f"{kind}/{hex_id[:2]}/{hex_id}"


#: The envelope header of docs/repository.md: magic, kind, compression, encryption, reserved, length.
_HEADER = struct.Struct(">4sBBBBQ")
_ENTRY_SIZE = 68


def _refs_chunk_ids(stored: bytes) -> Iterator[str]:
    """The chunk ids a refs segment lists (refs segments are never encrypted)."""
    magic, kind, compression, encryption, _reserved, length = _HEADER.unpack_from(stored)
    assert (magic, kind, encryption) == (b"CWBK", 3, 0), "not a plain refs segment"
    payload = stored[_HEADER.size :]
    plain = zstd.decompress(payload) if compression == 1 else payload
    assert len(plain) == length and length % _ENTRY_SIZE == 0
    for i in range(0, length, _ENTRY_SIZE):
        yield plain[i : i + 32].hex()


def referenced_objects(repo: Path) -> set[str]:
    """Every chunk, index and refs object the snapshots in ``repo/snapshots`` reference."""
    names: set[str] = set()
    snapdir = repo / "snapshots"
    for entry in snapdir.iterdir() if snapdir.is_dir() else ():
        if entry.name.startswith("."):
            continue
        doc = json.loads(entry.read_bytes())
        for disk in doc["manifest"]["disks"]:
            for seg in disk["segments"]:
                names.add(_object_name("index", seg["index"]))
                refs = _object_name("refs", seg["refs"])
                names.add(refs)
                names.update(
                    _object_name("chunks", cid) for cid in _refs_chunk_ids((repo / refs).read_bytes())
                )
    return names


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (dot files too) with its size and SHA-256: equal states mean that
    nothing was created, removed or rewritten with other bytes."""
    state = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            path = Path(dirpath, f)
            state[str(path.relative_to(root))] = (path.stat().st_size, file_sha256(path))
    return state


def kill_group(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``proc`` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.communicate(timeout=CLI_TIMEOUT)
