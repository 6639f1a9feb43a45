"""The repository commands: ``repo init|info|key``, ``snapshots``, ``forget``, ``gc``, ``verify``.

(``backup --repo``, ``restore`` and ``serve --repo`` live with the commands they extend.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cowbackup.cli import argtypes
from cowbackup.cli.errors import EXIT_FAILED, EXIT_OK
from cowbackup.cli.repo_common import (
    add_endpoint_argument,
    add_repo_arguments,
    emit_json,
    human,
    open_repository,
    read_passphrase,
)
from cowbackup.repo import gc, retention
from cowbackup.repo.backends import open_store
from cowbackup.repo.config import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL
from cowbackup.repo.errors import RepoUsageError
from cowbackup.repo.manifest import Manifest
from cowbackup.repo.repository import Repository, snapshot_name
from cowbackup.repo.verify import verify
from cowbackup.repo.workers import utc_now


def add_parsers(sub: Any) -> None:
    repo = sub.add_parser("repo", help="create and manage a backup repository")
    repo_sub = repo.add_subparsers(dest="repo_command", metavar="COMMAND", required=True)

    p = repo_sub.add_parser("init", help="create a repository")
    p.add_argument("repo", metavar="REPO", help="directory, or s3://BUCKET/PREFIX (the bucket must exist)")
    add_endpoint_argument(p)
    p.add_argument(
        "--encryption",
        choices=("repokey", "keyfile", "none"),
        default="repokey",
        help="repokey: key in the repository (default); keyfile: key in "
        "~/.config/cowbackup/keys; none: no encryption",
    )
    p.add_argument(
        "--chunk-size",
        type=argtypes.size,
        default=DEFAULT_CHUNK_SIZE,
        help="a power of two from 64K to 16M (default 4M)",
    )
    p.add_argument(
        "--compression-level", type=int, default=DEFAULT_LEVEL, help="zstd level, 0 for none (default 3)"
    )
    p.add_argument("--password-file", metavar="FILE", help="read the passphrase from FILE's first line")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_init, sync_level="file")

    p = repo_sub.add_parser("info", help="show a repository's settings")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("--json", action="store_true")
    add_endpoint_argument(p)
    p.set_defaults(func=run_info, sync_level="none", password_file=None)

    key = repo_sub.add_parser("key", help="export, import or re-protect the repository key")
    key_sub = key.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    p = key_sub.add_parser("export", help="write the wrapped key to FILE (keep it safe, apart)")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("file", metavar="FILE")
    add_endpoint_argument(p)
    p.set_defaults(func=run_key_export, sync_level="none", password_file=None)
    p = key_sub.add_parser("import", help="install a wrapped key from FILE (checked with its passphrase)")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--password-file", metavar="FILE")
    add_endpoint_argument(p)
    p.set_defaults(func=run_key_import, sync_level="file")
    p = key_sub.add_parser("change-password", help="re-wrap the key with a new passphrase")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("--password-file", metavar="FILE", help="the current passphrase")
    p.add_argument(
        "--new-password-file",
        metavar="FILE",
        help="the new passphrase (else $COWBACKUP_NEW_PASSWORD, else a prompt)",
    )
    add_endpoint_argument(p)
    p.set_defaults(func=run_key_change, sync_level="file")

    p = sub.add_parser("snapshots", help="list the snapshots of a repository")
    add_repo_arguments(p)
    p.add_argument("--name", help="only snapshots of this name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_snapshots)

    p = sub.add_parser("forget", help="forget snapshots by id or by a retention policy")
    add_repo_arguments(p)
    p.add_argument("snapshots", nargs="*", metavar="SNAP", help="snapshot ids (or prefixes) to forget")
    p.add_argument("--name", help="apply the policy to snapshots of this name only (default: to each name)")
    for rule in retention.RULES:
        p.add_argument(
            f"--keep-{rule}",
            type=int,
            default=0,
            metavar="N",
            help=f"keep the newest snapshot of each of the last N {rule if rule != 'last' else ''}"
            f"{' periods' if rule != 'last' else 'snapshots'}",
        )
    p.add_argument("--dry-run", action="store_true", help="only say what would be forgotten")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_forget)

    p = sub.add_parser("gc", help="delete what no snapshot needs (safe while backups run)")
    add_repo_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="only count")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_gc)

    p = sub.add_parser("verify", help="check that snapshots are whole")
    add_repo_arguments(p)
    p.add_argument("snapshots", nargs="*", metavar="SNAP", help="snapshots to check (default: all)")
    p.add_argument(
        "--read-data",
        nargs="?",
        const=100.0,
        type=argtypes.percent,
        metavar="PCT",
        help="also read the data of PCT%% of the chunks (default 100), each once",
    )
    p.add_argument(
        "--no-key",
        action="store_true",
        help="without the key: presence, sizes and stored checksums (for whoever keeps the storage)",
    )
    p.add_argument("--no-repair", action="store_true", help="report only: no quarantine, no damage records")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_verify)


# -- repo -----------------------------------------------------------------------------------------


def run_init(args: argparse.Namespace) -> int:
    passphrase = None
    if args.encryption != "none":
        passphrase = read_passphrase(args, confirm=True, prompt="New passphrase: ")
    repo = Repository.create(
        open_store(args.repo, "file", endpoint_url=args.endpoint_url),
        chunk_size=args.chunk_size,
        encryption=args.encryption,
        level=args.compression_level,
        passphrase=passphrase,
        created=utc_now(),
    )
    info = _info(repo)
    if args.json:
        emit_json(info)
    else:
        sys.stderr.write(
            f"cowbackup: created repository {repo.config.id} in {args.repo} "
            f"(chunks {human(repo.config.chunk_size)}, zstd {repo.config.level}, "
            f"encryption {repo.config.encryption})\n"
        )
        if args.encryption == "keyfile":
            sys.stderr.write(
                "cowbackup: the key is only on this machine: 'repo key export' it somewhere safe\n"
            )
    return EXIT_OK


def _info(repo: Repository) -> dict[str, Any]:
    c = repo.config
    return {
        "id": c.id,
        "location": repo.store.location,
        "chunk_size": c.chunk_size,
        "segment_entries": c.segment_entries,
        "compression": {"algorithm": "zstd", "level": c.level},
        "encryption": c.encryption,
        "created": c.created,
    }


def run_info(args: argparse.Namespace) -> int:
    repo = open_repository(args, key=False)
    info = _info(repo)
    info["snapshots"] = len(repo.snapshot_ids())
    if args.json:
        emit_json(info)
    else:
        for k, v in info.items():
            sys.stdout.write(f"{k}: {v}\n")
    return EXIT_OK


def run_key_export(args: argparse.Namespace) -> int:
    repo = open_repository(args, key=False)
    data = repo.export_key()
    try:
        with open(args.file, "xb") as f:
            f.write(data)
    except FileExistsError:
        raise RepoUsageError(f"'{args.file}' exists; the key is not written over a file") from None
    return EXIT_OK


def run_key_import(args: argparse.Namespace) -> int:
    repo = open_repository(args, key=False)
    try:
        with open(args.file, "rb") as f:
            data = f.read(1 << 20)
    except OSError as err:
        raise RepoUsageError(f"cannot read '{args.file}': {err.strerror}") from None
    repo.import_key(data, read_passphrase(args))
    return EXIT_OK


def run_key_change(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    new = argparse.Namespace(password_file=args.new_password_file)
    import os

    env = os.environ.get("COWBACKUP_NEW_PASSWORD")
    passphrase = (
        env.encode()
        if env and not args.new_password_file
        else read_passphrase(new, confirm=True, prompt="New passphrase: ")
    )
    repo.change_passphrase(passphrase)
    return EXIT_OK


# -- snapshots, forget, gc, verify ------------------------------------------------------------------


def snapshot_row(snap: Manifest, damaged: bool) -> dict[str, Any]:
    size = sum(d.size for d in snap.disks)
    return {
        "id": snap.id,
        "name": snap.name,
        "time": snap.time,
        "host": snap.host,
        "tags": snap.tags,
        "parent": snap.parent,
        "size": size,
        "stored_bytes": snap.stats.get("stored_bytes", 0),
        "added_bytes": snap.stats.get("new_stored_bytes", 0),
        "status": "damaged" if damaged else "ok",
        "disks": [
            {"name": d.name, "size": d.size, "changes": d.changes, "stats": d.stats} for d in snap.disks
        ],
        "stats": snap.stats,
    }


def run_snapshots(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    snaps = [s for s in repo.snapshots() if args.name is None or s.name == args.name]
    damage = repo.damage()
    rows = [snapshot_row(s, s.id in damage) for s in snaps]
    if args.json:
        emit_json(rows)
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for col in ("id", "name", "time", "size", "stored", "status"):
        table.add_column(col, justify="right" if col in ("size", "stored") else "left")
    for r in rows:
        table.add_row(
            r["id"][:8], r["name"], r["time"], human(r["size"]), human(r["stored_bytes"]), r["status"]
        )
    Console(file=sys.stdout).print(table)
    return EXIT_OK


def run_forget(args: argparse.Namespace) -> int:
    keep = {rule: getattr(args, f"keep_{rule}") for rule in retention.RULES}
    policy = any(v > 0 for v in keep.values())
    if any(v < 0 for v in keep.values()):
        raise RepoUsageError("--keep-* values must not be negative")
    if not policy and not args.snapshots:
        raise RepoUsageError("say what to forget: snapshot ids, or a policy with --keep-*")
    if policy and args.snapshots:
        raise RepoUsageError("give snapshot ids or a --keep-* policy, not both")
    repo = open_repository(args)
    forgotten: list[str] = []
    kept: list[str] = []
    if args.snapshots:
        forgotten = [repo.resolve(spec).id for spec in args.snapshots]
    else:
        snaps = [s for s in repo.snapshots() if args.name is None or s.name == args.name]
        by_name: dict[str, list[Manifest]] = {}
        for s in snaps:
            by_name.setdefault(s.name, []).append(s)
        for group in by_name.values():
            k, f = retention.select([retention.Item(s.id, s.time) for s in group], keep)
            kept += k
            forgotten += f
    if not args.dry_run:
        repo.store.delete(snapshot_name(sid) for sid in forgotten)
    if args.json:
        emit_json({"kept": kept, "forgotten": forgotten, "dry_run": args.dry_run})
    else:
        verb = "would forget" if args.dry_run else "forgot"
        sys.stderr.write(
            f"cowbackup: {verb} {len(forgotten)} snapshot(s), kept {len(kept) if policy else '-'}\n"
        )
        for sid in forgotten:
            sys.stdout.write(f"{sid}\n")
    return EXIT_OK


def run_gc(args: argparse.Namespace) -> int:
    repo = open_repository(args, key=False)
    result = gc.collect(repo, dry_run=args.dry_run)
    out = {
        "referenced": result.referenced,
        "unreferenced": result.condemned,
        "deleted": result.deleted,
        "deleted_bytes": result.deleted_bytes,
        "postponed": result.postponed,
        "dry_run": args.dry_run,
        "requests": repo.store.requests.snapshot(),
    }
    if args.json:
        emit_json(out)
    elif args.dry_run:
        sys.stderr.write(
            f"cowbackup: {result.condemned} unreferenced object(s), {human(result.deleted_bytes)} (dry run)\n"
        )
    else:
        later = f"; {len(result.postponed)} sweep(s) postponed while backups run" if result.postponed else ""
        sys.stderr.write(
            f"cowbackup: deleted {result.deleted} object(s), {human(result.deleted_bytes)}{later}\n"
        )
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    repo = open_repository(args, key=not args.no_key)
    ids = [repo.resolve(spec).id for spec in args.snapshots] if args.snapshots else None
    report = verify(repo, ids, read_data=args.read_data, repair=not args.no_repair)
    out = {
        "ok": report.ok,
        "snapshots": report.snapshots,
        "objects": report.objects,
        "chunks_read": report.chunks_read,
        "bytes_read": report.bytes_read,
        "bad": report.bad,
        "damaged": report.damaged,
        "quarantined": report.quarantined,
        "healed": report.healed,
        "unconfirmed": report.unconfirmed,
    }
    if args.json:
        emit_json(out)
    else:
        for name, problem in sorted(report.bad.items()):
            sys.stdout.write(f"bad object {name}: {problem}\n")
        for sid in sorted(report.damaged):
            sys.stdout.write(f"damaged snapshot {sid}\n")
        for sid, names in sorted(report.unconfirmed.items()):
            sys.stdout.write(
                f"snapshot {sid}: {len(names)} chunk(s) were stored again since it was taken; "
                "only a verify with the key can confirm them\n"
            )
        read = f", {report.chunks_read} chunk(s) read ({human(report.bytes_read)})" if args.read_data else ""
        state = (
            "ok"
            if report.ok
            else f"{len(report.bad)} bad object(s), {len(report.damaged)} damaged snapshot(s)"
        )
        sys.stderr.write(
            f"cowbackup: verified {report.snapshots} snapshot(s), {report.objects} object(s){read}: {state}\n"
        )
    return EXIT_OK if report.ok else EXIT_FAILED
