"""``backup SOURCE --repo REPO --name NAME`` and ``restore --repo REPO SNAP[:DISK] TARGET``.

A one-shot backup reads SOURCE (raw file, block device, qcow2 chain, NBD URI) whole -- holes are skipped
by block status, zero chunks detected, known chunks not uploaded -- and commits a snapshot.  Ctrl-C or
SIGTERM stops it: no snapshot appears, and what it stored is garbage for ``gc``.

Restore writes a snapshot's disk to a sparse raw file (zero chunks stay holes), a block device (zeros
by write-zeroes), a new qcow2 image, or an NBD export of the disk's size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cowbackup.block.errors import BlockError
from cowbackup.cli import argtypes
from cowbackup.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError, UsageError
from cowbackup.cli.progress import JsonReporter, make_reporter
from cowbackup.cli.repo_common import (
    add_endpoint_argument,
    add_repo_arguments,
    emit_json,
    human,
    open_repository,
    resolve_disk,
)
from cowbackup.cli.targets import source_options, target_options
from cowbackup.nbd.uri import is_nbd_uri
from cowbackup.repo.manifest import check_disk_name, check_snapshot_name

# The daemon, the server, the reader and the writer are imported by the functions that use them: the
# parser of ``backup`` is built from this module, and ``backup --qmp --repo`` needs none of them.

T = TypeVar("T")


def add_backup_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``backup`` gains for ``--repo`` (the parser is cli/backup.py's)."""
    g = p.add_argument_group("into a repository", "With --repo, SOURCE is stored as a snapshot (no TARGET).")
    g.add_argument(
        "--repo", metavar="REPO", help="back up into this repository (a directory or s3://BUCKET/PREFIX)"
    )
    add_endpoint_argument(g)
    g.add_argument("--name", metavar="NAME", help="the snapshot's name, e.g. host1/vm7/disk0")
    g.add_argument("--tag", action="append", default=[], metavar="TAG", help="a tag (repeatable)")
    g.add_argument("--disk", default="disk0", metavar="DISK", help="the disk's name in the snapshot (disk0)")
    g.add_argument(
        "--compression-level",
        type=int,
        default=None,
        metavar="N",
        help="zstd level for this backup (default: the repository's)",
    )
    g.add_argument("--no-cache", action="store_true", help="do not use the local cache of known chunks")
    g.add_argument("--password-file", metavar="FILE", help="read the passphrase from FILE's first line")
    g.add_argument(
        "--sync-level",
        choices=("none", "file", "filesystem"),
        default="filesystem",
        help="when data reaches the disk (default filesystem: syncfs before the commit)",
    )
    g.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NODE",
        help="with --qmp: another node backed up at the same instant into the same snapshot (a disk named "
        "after its node; repeatable)",
    )
    g.add_argument(
        "--audit",
        type=argtypes.percent,
        default=0.0,
        metavar="PCT",
        help="with --qmp --incremental: re-read PCT%% of the chunks the bitmap calls clean and compare them "
        "with the parent; any difference rejects the bitmap (loudly) and reads the whole disk",
    )
    g.add_argument(
        "--scratch-dir",
        metavar="DIR",
        help="with --qmp on qemu-storage-daemon (pull mode): where the fleecing scratch image goes "
        "(default: the temporary directory)",
    )
    g.add_argument(
        "--nbd-socket",
        metavar="PATH",
        help="with --qmp, pull mode: the unix socket of the NBD server the daemon already runs",
    )
    g.add_argument(
        "--repo-workers",
        type=argtypes.positive_int,
        default=0,
        metavar="N",
        help="threads hashing, compressing, encrypting and storing (default 2 x cores)",
    )


def add_restore_parser(sub: Any) -> None:
    p = sub.add_parser(
        "restore",
        help="restore a snapshot's disk from a repository",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_repo_arguments(p)
    p.add_argument("snapshot", metavar="SNAP[:DISK]", help="snapshot id (prefix), 'latest' or NAME@latest")
    p.add_argument("target", metavar="TARGET", help="raw file (created sparse), block device, or NBD URI")
    p.add_argument("--target-format", choices=("raw", "qcow2"), default="raw")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty file or a block device")
    p.add_argument(
        "--partial",
        action="store_true",
        help="restore a damaged snapshot anyway: zeros where data is lost, listed",
    )
    p.add_argument("--workers", type=argtypes.positive_int, default=0, help="parallel chunk fetches")
    p.add_argument("--json", action="store_true", help="progress and result as JSON lines")
    instant = p.add_argument_group(
        "instant restore",
        "With --serve, TARGET is served over NBD at once, while the snapshot is copied into it in the "
        "background: a read of what is not restored yet fetches it first, a write counts as restored. "
        "Serving goes on after the copy completes, until Ctrl-C.",
    )
    instant.add_argument("--serve", action="store_true", help="serve TARGET over NBD while restoring")
    where = instant.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="with --serve: listen on this unix socket")
    where.add_argument("--bind", metavar="HOST[:PORT]", help="with --serve: listen on TCP")
    instant.add_argument("--name", default="", help="with --serve: the export name (default: empty)")
    instant.add_argument(
        "--speed", type=argtypes.size, default=0, help="with --serve: background copy limit, bytes/s"
    )
    p.set_defaults(func=run_restore)


async def _cancellable(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` so that SIGINT and SIGTERM cancel it (its cleanup runs); CliError 130 if they did."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work())
    signals: list[int] = []

    def stop(signum: int) -> None:
        signals.append(signum)
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if signals:
            name = signal.Signals(signals[0]).name
            raise CliError(f"interrupted by {name}: nothing was committed", EXIT_INTERRUPTED) from None
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


# -- backup ---------------------------------------------------------------------------------------


def run_backup(args: argparse.Namespace) -> int:
    if args.target is not None:
        raise UsageError("with --repo there is no TARGET: the snapshot goes into the repository")
    if not args.name:
        raise UsageError("--repo needs --name NAME (for example host1/vm7/disk0)")
    if args.node:
        raise UsageError("--node needs --qmp (several disks of a running daemon at one instant)")
    try:
        check_snapshot_name(args.name)
        check_disk_name(args.disk)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.compression_level is not None and not 0 <= args.compression_level <= 22:
        raise UsageError("--compression-level must be 0 to 22")
    repo = open_repository(args)
    return asyncio.run(_cancellable(lambda: _backup(args, repo)))


async def _backup(args: argparse.Namespace, repo: Any) -> int:
    from cowbackup.daemon import Daemon
    from cowbackup.repo.writer import BackupRun

    reporter = make_reporter(args.json)
    daemon = Daemon()
    run: BackupRun | None = None
    try:
        try:
            node = await daemon.blockdev_add(
                {**source_options(args.source, args.source_format), "node-name": "source"}
            )
        except BlockError as err:
            raise UsageError(str(err)) from None
        run = await BackupRun.start(
            repo, use_cache=not args.no_cache, workers=args.repo_workers, level=args.compression_level
        )
        loop = asyncio.get_running_loop()
        previous = await loop.run_in_executor(None, _latest_id, repo, args.name)
        done = 0
        started = time.monotonic()
        reporter.start(args.name, node.size)

        def progress(n: int) -> None:
            nonlocal done
            done += n
            reporter.update(done, node.size)

        disk = await run.write_disk(args.disk, node, source=args.source, progress=progress)
        snap = await run.commit(args.name, [disk], tags=args.tag, parent=previous)
        await run.close()  # its session's end is part of what the command sent
        reporter.update(done, node.size, force=True)
        reporter.stop()
        elapsed = time.monotonic() - started
        rate = node.size / elapsed if elapsed > 0 else 0.0
        result = {
            "snapshot": snap.id,
            "name": snap.name,
            "bytes": node.size,
            "seconds": elapsed,
            "rate": rate,
            "stats": snap.stats,
            # Everything the command sent, opening the repository included (the stats count the
            # backup session up to its commit).
            "requests": repo.store.requests.snapshot(),
        }
        if isinstance(reporter, JsonReporter):
            reporter.result(result)
        else:
            s = snap.stats
            sys.stderr.write(
                f"cowbackup: snapshot {snap.id[:8]} of {args.name}: {human(node.size)} in {elapsed:.2f} s "
                f"({human(rate)}/s); {human(s.get('data_bytes', 0))} data, "
                f"{human(s.get('zero_bytes', 0))} zero, {s.get('new_chunks', 0)} new chunk(s) "
                f"({human(s.get('new_stored_bytes', 0))} stored)\n"
            )
        return EXIT_OK
    finally:
        reporter.stop()
        if run is not None:
            await run.close()
        await daemon.close()


def _latest_id(repo: Any, name: str) -> str | None:
    snaps = [s for s in repo.snapshots(skip_corrupt=True) if s.name == name]
    return snaps[-1].id if snaps else None


# -- restore --------------------------------------------------------------------------------------


def run_restore(args: argparse.Namespace) -> int:
    if not args.serve and (args.socket or args.bind or args.speed or args.name):
        raise UsageError("--socket, --bind, --name and --speed are for --serve (instant restore)")
    repo = open_repository(args)
    snap, disk = resolve_disk(repo, args.snapshot)
    fresh = _fresh_target(args.target, args.target_format)
    if args.serve:
        return _instant_restore(args, repo, snap.id, disk, fresh)
    return asyncio.run(_cancellable(lambda: _restore(args, repo, snap.id, disk, fresh)))


def _instant_restore(args: argparse.Namespace, repo: Any, sid: str, disk: Any, fresh: bool) -> int:
    """``restore --serve``: serve TARGET at once while the snapshot is copied into it (serve.py)."""
    if args.partial:
        raise UsageError("--partial is not for --serve: a read of a lost range fails with EIO there")
    if is_nbd_uri(args.target):
        raise UsageError("--serve restores into a local file or block device, not an NBD export")
    from cowbackup.cli import serve

    reporter = make_reporter(args.json)
    reporter.start(f"restore {sid[:8]}:{disk.name}", disk.size)
    opener = serve.InstantRestoreOpener(
        repo,
        sid,
        disk,
        target_options(args.target, disk.size, args.force, args.target_format),
        target_reads_zero=fresh,
        speed=args.speed,
        progress=lambda done, total: reporter.update(done, total),
    )
    # serve's own options, for the NBD server it runs.
    args.read_only, args.tls_creds, args.no_verify_peer, args.qmp, args.allocation_depth = (
        False,
        None,
        False,
        None,
        False,
    )
    if args.socket:
        args.socket = os.path.abspath(args.socket)
    try:
        return asyncio.run(serve.serve_disk(args, opener))
    finally:
        reporter.stop()


def _fresh_target(path: str, fmt: str) -> bool:
    """True when the target will read as zeros before we write (a new or truncated file or qcow2)."""
    if is_nbd_uri(path):
        return False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    return stat.S_ISREG(st.st_mode) or fmt == "qcow2"


async def _restore(args: argparse.Namespace, repo: Any, sid: str, disk: Any, fresh: bool) -> int:
    from cowbackup.daemon import Daemon
    from cowbackup.repo.reader import restore_disk

    reporter = make_reporter(args.json)
    daemon = Daemon()
    try:
        try:
            options = target_options(args.target, disk.size, args.force, args.target_format)
            target = await daemon.blockdev_add({**options, "node-name": "target"})
        except BlockError as err:
            raise UsageError(str(err)) from None
        if target.read_only:
            raise UsageError(f"target '{args.target}' is read-only")
        if target.size < disk.size:
            raise UsageError(f"target '{args.target}' has {target.size} bytes; the disk needs {disk.size}")
        done = 0
        started = time.monotonic()
        reporter.start(f"restore {sid[:8]}:{disk.name}", disk.size)

        def progress(n: int) -> None:
            nonlocal done
            done += n
            reporter.update(done, disk.size)

        bad = await restore_disk(
            repo,
            disk,
            target,
            target_reads_zero=fresh,
            partial=args.partial,
            workers=args.workers,
            progress=progress,
        )
        reporter.update(done, disk.size, force=True)
        reporter.stop()
        elapsed = time.monotonic() - started
        result = {
            "snapshot": sid,
            "disk": disk.name,
            "bytes": disk.size,
            "seconds": elapsed,
            "rate": disk.size / elapsed if elapsed > 0 else 0.0,
            "bad_ranges": [{"offset": b.offset, "length": b.length, "reason": b.reason} for b in bad],
        }
        if isinstance(reporter, JsonReporter):
            reporter.result(result)
        else:
            sys.stderr.write(
                f"cowbackup: restored {sid[:8]}:{disk.name} ({human(disk.size)}) in {elapsed:.2f} s\n"
            )
            for b in bad:
                sys.stderr.write(f"cowbackup: zeros at [{b.offset}, +{b.length}): {b.reason}\n")
        return EXIT_FAILED if bad else EXIT_OK
    finally:
        reporter.stop()
        await daemon.close()


__all__ = ["add_backup_arguments", "add_restore_parser", "emit_json", "run_backup", "run_restore"]
