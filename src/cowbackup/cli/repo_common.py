"""What every repository command shares: ``--repo``, the passphrase, opening the repository, output.

The passphrase comes from ``--password-file FILE`` (its first line), else ``$COWBACKUP_PASSWORD``, else
a prompt when stdin is a terminal; with none of them an encrypted repository is refused (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from cowbackup.repo.backends import open_store
from cowbackup.repo.errors import RepoUsageError, SnapshotNotFound, WrongPassphrase
from cowbackup.repo.keys import passphrase_from
from cowbackup.repo.manifest import DiskRecord, Manifest, check_disk_name
from cowbackup.repo.repository import PassphraseSource, Repository
from cowbackup.repo.store_local import SYNC_LEVELS


def add_repo_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument(
        "--repo",
        metavar="REPO",
        required=required,
        help="the repository: a directory, or s3://BUCKET/PREFIX (credentials from the AWS environment "
        "or ~/.aws; see --endpoint-url)",
    )
    add_endpoint_argument(p)
    p.add_argument("--password-file", metavar="FILE", help="read the passphrase from FILE's first line")
    p.add_argument(
        "--sync-level",
        choices=SYNC_LEVELS,
        default="filesystem",
        help="when data reaches the disk: file (fsync each object), filesystem (syncfs before each "
        "commit; default), none (never; for scratch repositories)",
    )


def add_endpoint_argument(p: Any) -> None:
    """Add ``--endpoint-url`` to a parser or an argument group."""
    p.add_argument(
        "--endpoint-url",
        metavar="URL",
        default=None,
        help="the S3 endpoint of an s3:// repository "
        "(default: $COWBACKUP_S3_ENDPOINT, else $AWS_ENDPOINT_URL, else AWS)",
    )


def read_passphrase(
    args: argparse.Namespace, *, confirm: bool = False, prompt: str = "Passphrase: "
) -> bytes:
    given = passphrase_from(getattr(args, "password_file", None), "--password-file")
    if given is not None:
        return given
    if not sys.stdin.isatty():
        raise RepoUsageError(
            "the repository is encrypted: give its passphrase with --password-file or COWBACKUP_PASSWORD"
        )
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Repeat the passphrase: ") != first:
        raise WrongPassphrase("the two passphrases differ")
    if not first:
        raise RepoUsageError("empty passphrase")
    return first.encode()


def open_repository(args: argparse.Namespace, *, key: bool = True) -> Repository:
    """Open ``--repo``; ``key`` False opens an encrypted repository without its key.  The store counts
    the requests the command sends (``repo.store.requests``)."""
    store = open_store(args.repo, args.sync_level, endpoint_url=getattr(args, "endpoint_url", None))
    source: PassphraseSource | None = (lambda: read_passphrase(args)) if key else None
    return Repository.open(store, source)


@contextlib.contextmanager
def daemon_key_file(repo: Repository) -> Iterator[str | None]:
    """A private temporary file holding ``repo``'s unwrapped key, for a daemon's repository target node
    to open the repository with (its ``key-file``) without running scrypt again; removed when the block
    ends.  None for a repository that is not encrypted.  The key is never put on a command line, in a
    QMP message or in a log: only the file's name travels."""
    if not repo.encrypted:
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="cowbackup-key-")  # mode 0600, created exclusively
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(repo.dump_master())
        yield path
    finally:
        os.unlink(path)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None) + "\n")
    sys.stdout.flush()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def resolve_disk(repo: Repository, text: str) -> tuple[Manifest, DiskRecord]:
    """``SNAP[:DISK]``: a snapshot (id, prefix, ``latest``, ``NAME@latest``) and one of its disks.

    A snapshot name may hold ``:`` itself, so the last ``:`` only separates a disk when what follows is
    a disk name and what precedes it names a snapshot.  RepoUsageError when the disk is ambiguous or
    absent.
    """
    spec, sep, disk_name = text.rpartition(":")
    snap = None
    if sep and spec:
        try:
            check_disk_name(disk_name)
            snap = repo.resolve(spec)
        except (ValueError, SnapshotNotFound):
            snap = None
    if snap is None:
        snap, disk_name = repo.resolve(text), ""
    try:
        return snap, snap.disk(disk_name or None)
    except KeyError as err:
        raise RepoUsageError(str(err.args[0])) from None
