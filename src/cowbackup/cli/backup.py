"""``cowbackup backup SOURCE TARGET``: a one-shot backup of an image nobody else is writing.

For a stopped VM's disk or an LVM snapshot.  It runs the same engine as the daemon -- an in-process
daemon, the copy-before-write filter, the backup job -- and shows progress.  TARGET is created sparse
with the source's size when absent; an existing non-empty TARGET is only overwritten with ``--force``.
Ctrl-C (or SIGTERM) cancels the job cleanly and exits 130.

SOURCE and TARGET may also be NBD URIs (``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``,
``nbds...`` with ``?tls-certificates=DIR``).  An NBD source is opened read-only and its holes are skipped
(``base:allocation``).  An NBD target is never created: the export must exist with the source's size, and
``--force`` is not needed -- the server decides who may write to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from cowbackup.cli import argtypes, repo_backup
from cowbackup.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError, UsageError
from cowbackup.nbd.uri import is_nbd_uri

if TYPE_CHECKING:
    from cowbackup.cli.progress import Reporter
    from cowbackup.daemon import Daemon
    from cowbackup.jobs.backup import BackupParams
    from cowbackup.jobs.events import Event

# The one-shot backup's engine (the daemon, the job, the drivers) and the live paths are imported by the
# functions that use them: each kind of backup loads only its own (``backup --qmp --repo`` runs nightly).


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "backup",
        help="back up an image that nobody else is writing",
        description=(
            "Back up SOURCE into TARGET (point-in-time copy; holes and zeros stay sparse).  Either may be an "
            "NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://...?tls-certificates="
            "DIR).  An NBD target is not created: the export must exist with the source's size, and --force "
            "is not needed for it (the NBD server decides who may write)."
        ),
    )
    p.add_argument("source", metavar="SOURCE", help="source image (raw file, block device or NBD URI)")
    p.add_argument(
        "target",
        metavar="TARGET",
        nargs="?",
        help="target image (created sparse if absent) or NBD URI (must exist); none with --repo",
    )
    p.add_argument(
        "--sync",
        choices=("full", "top", "none"),
        default="full",
        help="what to copy (default: full; none: only with --qmp, runs until Ctrl-C)",
    )
    p.add_argument(
        "--speed", type=argtypes.size, default=0, help="limit in bytes per second, e.g. 100M (0: none)"
    )
    p.add_argument("--cluster-size", type=argtypes.size, default=0, help="copy unit, a power of two >= 64K")
    p.add_argument(
        "--workers", type=argtypes.positive_int, default=64, help="parallel copy tasks (default 64)"
    )
    p.add_argument(
        "--max-chunk", type=argtypes.size, default=0, help="largest single copy (default: engine's)"
    )
    p.add_argument("--copy-range", action="store_true", help="copy with copy_file_range (local files)")
    p.add_argument(
        "--force", action="store_true", help="overwrite a non-empty TARGET file (not needed for NBD targets)"
    )
    p.add_argument("--json", action="store_true", help="print progress and events as JSON lines")
    live = p.add_argument_group(
        "live backup",
        "With --qmp, a running daemon (cowbackup daemon/serve, qemu-storage-daemon) backs up its node "
        "SOURCE into TARGET while it is in use.",
    )
    live.add_argument("--qmp", metavar="SOCKET", help="the daemon's QMP monitor socket; SOURCE: a node name")
    live.add_argument("--job-id", metavar="ID", help="the job's id (default: backup-NODE)")
    p.add_argument(
        "--target-format",
        choices=("raw", "qcow2"),
        default="raw",
        help="format of TARGET (default raw); qcow2 creates a qcow2 image with the source's size",
    )
    p.add_argument(
        "--backing-file",
        metavar="PREV",
        help="with --target-format qcow2: PREV (a qcow2 image, e.g. the previous backup) becomes TARGET's "
        "backing file, stored as given -- a relative name is relative to TARGET's directory, as with "
        "'qemu-img create -b'; the backup writes only what it copies, reads go through the chain",
    )
    p.add_argument(
        "--source-format",
        choices=("raw", "qcow2"),
        default=None,
        help="format of SOURCE (default: probed -- qcow2 if it starts with the qcow2 magic, else raw)",
    )
    repo_backup.add_backup_arguments(p)
    p.set_defaults(func=run, backup_parser=p)


def run(args: argparse.Namespace) -> int:
    if args.repo is not None:
        if args.qmp is not None:
            from cowbackup.cli import live_repo

            return live_repo.run(args)
        return repo_backup.run_backup(args)
    if args.target is None:
        args.backup_parser.error("the following arguments are required: TARGET (or --repo)")
    if args.qmp is not None:
        from cowbackup.cli import live

        return live.run_backup(args)
    if args.job_id is not None:
        raise UsageError("--job-id needs --qmp")
    if args.sync == "none":
        # As argparse words a bad choice: for the one-shot backup, 'none' is not one.
        args.backup_parser.error(
            "argument --sync: invalid choice: 'none' (choose from 'full', 'top'; 'none' needs --qmp)"
        )
    if args.cluster_size and (args.cluster_size < 65536 or args.cluster_size & (args.cluster_size - 1)):
        raise UsageError(f"--cluster-size must be a power of two of at least 64K, not {args.cluster_size}")
    if args.max_chunk and args.max_chunk < max(args.cluster_size, 65536):
        raise UsageError("--max-chunk must be at least the cluster size")
    if is_nbd_uri(args.source) or is_nbd_uri(args.target):
        if args.source == args.target:
            raise UsageError("source and target are the same NBD export")
    elif os.path.realpath(args.source) == os.path.realpath(args.target):
        raise UsageError("source and target are the same file")
    return asyncio.run(_backup(args))


async def _backup(args: argparse.Namespace) -> int:
    from cowbackup.block.errors import BlockError
    from cowbackup.cli.progress import make_reporter
    from cowbackup.cli.targets import check_nbd_target, source_options, target_options
    from cowbackup.daemon import Daemon
    from cowbackup.jobs.backup import BackupParams, BackupPerf

    reporter = make_reporter(args.json)
    daemon = Daemon()
    try:
        source_opts = source_options(args.source, args.source_format)
        source = await daemon.blockdev_add({**source_opts, "node-name": "source"})
        target_opts = target_options(
            args.target, source.size, args.force, args.target_format, args.backing_file
        )
        target = await daemon.blockdev_add({**target_opts, "node-name": "target"})
        if is_nbd_uri(args.target):
            check_nbd_target(args.target, target.size, source.size, target.read_only)
        params = BackupParams(
            job_id="backup0",
            device="source",
            target="target",
            sync=args.sync,
            speed=args.speed,
            perf=BackupPerf(
                use_copy_range=args.copy_range,
                max_workers=args.workers,
                max_chunk=args.max_chunk,
                min_cluster_size=args.cluster_size,
            ),
        )
        return await _run_job(daemon, params, reporter, args)
    except BlockError as err:
        raise UsageError(str(err)) from None
    finally:
        await daemon.close()


async def _run_job(daemon: Daemon, params: BackupParams, reporter: Reporter, args: argparse.Namespace) -> int:
    from cowbackup.cli.progress import PROGRESS_INTERVAL
    from cowbackup.cli.targets import summary
    from cowbackup.jobs.job import JobStatus

    loop = asyncio.get_running_loop()
    interrupted: list[int] = []
    outcome: dict[str, Any] = {}

    def on_event(event: Event) -> None:
        reporter.event(event.name, event.data)
        if event.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            outcome.update(event.data, event=event.name)

    # Creating the job emits its first events; hold them until the "start" line, which needs the job.
    creation: list[Event] = []
    unsubscribe = daemon.jobs.events.subscribe(creation.append)
    try:
        job = daemon.blockdev_backup(params)
    finally:
        unsubscribe()
    # No await from here to the subscription: no event can be missed in between.
    reporter.start(job.id, job.progress_total)
    for event in creation:
        on_event(event)
    unsubscribe = daemon.jobs.events.subscribe(on_event)

    def interrupt(signum: int) -> None:
        if interrupted:
            return
        interrupted.append(signum)
        job.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt, signum)
    started = time.monotonic()
    try:
        while job.status not in (JobStatus.CONCLUDED, JobStatus.NULL):
            reporter.update(job.progress_current, job.progress_total)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.wait_concluded(), PROGRESS_INTERVAL)
        reporter.update(job.progress_current, job.progress_total, force=True)  # the final sample, always
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        reporter.stop()
        unsubscribe()
    elapsed = time.monotonic() - started
    if interrupted:
        name = signal.Signals(interrupted[0]).name
        raise CliError(
            f"interrupted by {name}: backup cancelled, '{args.target}' is incomplete", EXIT_INTERRUPTED
        )
    if outcome.get("error") or outcome.get("event") != "BLOCK_JOB_COMPLETED":
        raise CliError(f"backup failed: {outcome.get('error', 'job did not complete')}", EXIT_FAILED)
    await daemon.graph.get("target").flush()
    summary(args, reporter, int(outcome.get("len", 0)), elapsed)
    return EXIT_OK
