"""What every repository command shares: ``--repo``, the passphrase, opening the repository, output.

The passphrase comes from ``--password-file FILE`` (its first line), else ``$COWBACKUP_PASSWORD``, else
a prompt when stdin is a terminal; with none of them an encrypted repository is refused (exit 2).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from cowbackup.repo.backends import open_store
from cowbackup.repo.errors import RepoUsageError, WrongPassphrase
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
    if getattr(args, "password_file", None):
        try:
            with open(args.password_file, "rb") as f:
                line = f.readline().rstrip(b"\r\n")
        except OSError as err:
            raise RepoUsageError(
                f"cannot read --password-file '{args.password_file}': {err.strerror}"
            ) from None
        if not line:
            raise RepoUsageError(f"--password-file '{args.password_file}' is empty")
        return line
    env = os.environ.get("COWBACKUP_PASSWORD")
    if env:
        return env.encode()
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


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None) + "\n")
    sys.stdout.flush()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
