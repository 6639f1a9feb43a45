"""QMP-client subcommands: live backups and job control on a running daemon.

These talk to a ``cowbackup daemon``, ``cowbackup serve --qmp`` or ``qemu-storage-daemon`` over its QMP
monitor socket with the ``qemu.qmp`` client, using only commands both implement::

    cowbackup backup --qmp SOCKET NODE TARGET   blockdev-add TARGET, blockdev-backup, follow, blockdev-del
        [--incremental --bitmap NAME]           sync=incremental: only what bitmap NAME marks dirty; on
                                                success NAME restarts from the backup's instant
        [--bitmap NAME --bitmap-mode MODE]      any sync with a bitmap, as blockdev-backup allows
        [--fallback-full]                       NAME missing or inconsistent: a full backup, and NAME
                                                created anew at its instant (one transaction)
    cowbackup jobs --qmp SOCKET                 query-jobs + query-block-jobs, as a table or JSON
    cowbackup job VERB ID [SPEED] --qmp SOCKET  job-pause / -resume / -cancel / -finalize / -dismiss,
                                                block-job-set-speed
    cowbackup qmp --socket SOCKET COMMAND [JSON-ARGS]   any command; prints the reply's ``return``

A live backup, step by step::

    query-named-block-nodes      NODE's size (and: does NODE exist?)
    (create TARGET)              a local file: sparse, NODE's size (--target-format qcow2: a qcow2
                                 image, over --backing-file PREV if given); an NBD URI: used as it is
    blockdev-add                 TARGET as node "<job-id>-target" (driver file, discard=unmap; qcow2
                                 with backing: null -- the job only writes; or nbd)
    blockdev-backup              job-id, device=NODE, target, sync, speed (auto-dismiss: the job ends null)
    query-jobs every 0.2 s       progress -> the reporter (bar on a terminal, --json lines)
    events                       BLOCK_JOB_COMPLETED / _CANCELLED / _ERROR, JOB_STATUS_CHANGE(null) ends it
    blockdev-del                 the target node, whatever happened

Exit status: 0 when BLOCK_JOB_COMPLETED carries no error; 1 when it does, when the job is cancelled by
someone else, or when the daemon refuses a command or goes away; 130 on SIGINT/SIGTERM, after
``job-cancel`` has ended the job.  A refused QMP command is one line: ``cowbackup: <class>: <desc>``.

qemu-storage-daemon talks to one client per monitor socket at a time (the others wait unanswered); give
it a second ``--monitor`` for ``jobs`` and ``job`` while ``backup --qmp`` follows a job.  A ``cowbackup``
daemon serves any number of clients on one socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from cowbackup.block.errors import BlockError
from cowbackup.cli import argtypes
from cowbackup.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError, UsageError
from cowbackup.cli.progress import PROGRESS_INTERVAL, Reporter, make_reporter

# The one-shot backup's target preparation, NBD target checks and summary line.
from cowbackup.cli.targets import check_nbd_target, summary, target_options
from cowbackup.ids import is_wellformed_id
from cowbackup.nbd.uri import is_nbd_uri

log = logging.getLogger(__name__)

#: Longest wait for the QMP greeting and capability negotiation.
CONNECT_TIMEOUT = 10.0
#: QEMU keeps node names in a char[32]: at most 31 characters.
_MAX_NODE_NAME = 31
#: Events a live backup follows (filtered further by job id).
JOB_EVENTS = (
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_PENDING",
    "BLOCK_JOB_READY",
    "JOB_STATUS_CHANGE",
)
#: `cowbackup job VERB`: the QMP command of each verb.
_VERBS = {
    "pause": "job-pause",
    "resume": "job-resume",
    "cancel": "job-cancel",
    "finalize": "job-finalize",
    "dismiss": "job-dismiss",
    "set-speed": "block-job-set-speed",
}


# ---------------------------------------------------------------------------------- parsers


def add_parsers(sub: Any) -> None:
    """Register ``jobs``, ``job`` and ``qmp`` (``backup --qmp`` is registered by :mod:`.backup`; its
    bitmap options are added here, to the parser :mod:`.backup` registered first)."""
    backup_parser = sub.choices.get("backup")
    if backup_parser is not None:
        _add_bitmap_options(backup_parser)
    p = sub.add_parser(
        "jobs",
        help="list the jobs of a running daemon",
        description="List the jobs of a running daemon (query-jobs, with the speed from query-block-jobs).",
    )
    p.add_argument("--qmp", metavar="SOCKET", required=True, help="the daemon's QMP monitor socket")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(func=run_jobs)

    p = sub.add_parser(
        "job",
        help="pause, resume, cancel, finalize, dismiss a job or set its speed",
        description=(
            "Control one job of a running daemon: job-pause, job-resume, job-cancel, job-finalize, "
            "job-dismiss, or block-job-set-speed (SPEED in bytes per second, e.g. 100M; 0: unlimited)."
        ),
    )
    p.add_argument("verb", choices=tuple(_VERBS), metavar="VERB", help=", ".join(_VERBS))
    p.add_argument("job_id", metavar="ID", help="the job's id")
    p.add_argument("speed", metavar="SPEED", nargs="?", type=argtypes.size, help="for set-speed")
    p.add_argument("--qmp", metavar="SOCKET", required=True, help="the daemon's QMP monitor socket")
    p.set_defaults(func=run_job)

    p = sub.add_parser(
        "qmp",
        help="run one QMP command on a running daemon",
        description=(
            "Run COMMAND with the JSON object JSON-ARGS as its arguments and print the reply's return "
            "value as JSON.  A refused command prints 'cowbackup: <class>: <desc>' and exits 1."
        ),
    )
    p.add_argument("--socket", metavar="SOCKET", required=True, help="the daemon's QMP monitor socket")
    p.add_argument("--pretty", action="store_true", help="indent the JSON reply")
    p.add_argument("qmp_command", metavar="COMMAND", help="e.g. query-version, query-named-block-nodes")
    p.add_argument("qmp_args", metavar="JSON-ARGS", nargs="?", help='e.g. \'{"id": "job0"}\'')
    p.set_defaults(func=run_qmp)


def _add_bitmap_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "incremental backup (with --qmp)",
        "Copy only what a dirty bitmap of NODE marks (create one with 'cowbackup bitmap add', or in the "
        "same transaction as a full backup).",
    )
    group.add_argument(
        "--incremental", action="store_true", help="sync=incremental: copy the clusters --bitmap marks dirty"
    )
    group.add_argument("--bitmap", metavar="NAME", help="the dirty bitmap of NODE to use")
    group.add_argument(
        "--fallback-full",
        action="store_true",
        help="if --bitmap is missing or inconsistent (the daemon crashed), take a full backup instead and "
        "start the bitmap anew at its instant",
    )
    group.add_argument(
        "--bitmap-mode",
        choices=("on-success", "never", "always"),
        help="what NAME holds afterwards (incremental: on-success, the only mode it allows)",
    )
    one_shot = p.get_default("func")

    def run(args: argparse.Namespace) -> int:
        if args.qmp is None and (args.incremental or args.bitmap or args.bitmap_mode or args.fallback_full):
            raise UsageError("--incremental, --bitmap, --bitmap-mode and --fallback-full need --qmp")
        if args.fallback_full and not args.bitmap:
            raise UsageError("--fallback-full needs --bitmap NAME")
        result: int = one_shot(args)
        return result

    p.set_defaults(func=run)


def _sync_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``sync``, ``bitmap`` and ``bitmap-mode`` for blockdev-backup; the daemon checks the combination."""
    sync = args.sync
    if getattr(args, "incremental", False):
        if sync != "full":
            raise UsageError(f"--incremental and --sync {sync} contradict each other")
        if not args.bitmap:
            raise UsageError("--incremental needs --bitmap NAME")
        sync = "incremental"
    out: dict[str, Any] = {"sync": sync}
    if getattr(args, "bitmap", None):
        out["bitmap"] = args.bitmap
    if getattr(args, "bitmap_mode", None):
        out["bitmap-mode"] = args.bitmap_mode
    return out


def _fallback_actions(
    args: argparse.Namespace, source: Mapping[str, Any], backup: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """With --fallback-full and a bitmap the daemon cannot use (missing, or inconsistent after a crash):
    the transaction that creates it anew and starts a full backup -- the new bitmap records exactly the
    writes after the full backup's instant, ready for the next incremental. None otherwise.

    An inconsistent bitmap must be removed first, by itself: a transaction's remove frees the name only
    when it commits (QEMU's rule), so an add of the same name in it would fail.
    """
    if not getattr(args, "fallback_full", False):
        return None
    name = args.bitmap
    entry = next((e for e in source.get("dirty-bitmaps", []) if e.get("name") == name), None)
    if entry is not None and not entry.get("inconsistent", False):
        return None
    state = "missing" if entry is None else "inconsistent"
    sys.stderr.write(f"cowbackup: warning: bitmap '{name}' is {state}: taking a full backup instead\n")
    add: dict[str, Any] = {"node": args.source, "name": name}
    if entry is not None:
        add.update(granularity=entry["granularity"], persistent=entry["persistent"])
    full = {k: v for k, v in backup.items() if k not in ("bitmap", "bitmap-mode")}
    return [
        {"type": "block-dirty-bitmap-add", "data": add},
        {"type": "blockdev-backup", "data": {**full, "sync": "full"}},
    ]


# ---------------------------------------------------------------------------------- the connection


@contextlib.asynccontextmanager
async def connect(path: str) -> AsyncIterator[QMPClient]:
    """A negotiated QMP session on the unix socket ``path``; CliError (exit 1) if there is none."""
    if not log.isEnabledFor(logging.DEBUG):
        # qemu.qmp logs every failure it raises; we report them ourselves, once (-vv shows its logs).
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    client = QMPClient("cowbackup")
    try:
        await asyncio.wait_for(client.connect(path), CONNECT_TIMEOUT)
    except QMPError as err:
        raise CliError(f"cannot connect to the QMP socket '{path}': {err}") from None
    except TimeoutError:
        # qemu-storage-daemon serves one client per monitor socket; the others wait in the backlog.
        raise CliError(
            f"no QMP greeting on '{path}' within {CONNECT_TIMEOUT:.0f} s; is another client connected? "
            "(qemu-storage-daemon serves one client per --monitor)"
        ) from None
    try:
        yield client
    finally:
        try:
            await client.disconnect()
        except (QMPError, OSError, EOFError) as err:
            # disconnect() re-raises what broke the connection; the command already reported it.
            log.debug("disconnect: %s", err)


async def execute(client: QMPClient, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
    """Run one command; a refusal is CliError ``<class>: <desc>``, a lost daemon CliError too."""
    try:
        return await client.execute(command, arguments)
    except ExecuteError as err:
        raise CliError(f"{err.error_class}: {err}") from None
    except QMPError as err:
        raise CliError(f"lost the connection to the daemon during '{command}': {err}") from None


# ---------------------------------------------------------------------------------- qmp, job, jobs


def run_qmp(args: argparse.Namespace) -> int:
    arguments: dict[str, Any] | None = None
    if args.qmp_args is not None:
        try:
            parsed = json.loads(args.qmp_args)
        except json.JSONDecodeError as err:
            raise UsageError(f"JSON-ARGS is not valid JSON: {err}") from None
        if not isinstance(parsed, dict):
            raise UsageError("JSON-ARGS must be a JSON object")
        arguments = parsed
    return asyncio.run(_qmp(args.socket, args.qmp_command, arguments, args.pretty))


async def _qmp(path: str, command: str, arguments: dict[str, Any] | None, pretty: bool) -> int:
    async with connect(path) as client:
        reply = await execute(client, command, arguments)
    print(json.dumps(reply, indent=2 if pretty else None))
    return EXIT_OK


def run_job(args: argparse.Namespace) -> int:
    if args.verb == "set-speed":
        if args.speed is None:
            raise UsageError("job set-speed needs SPEED (bytes per second, e.g. 100M; 0: unlimited)")
        arguments: dict[str, Any] = {"device": args.job_id, "speed": args.speed}
    else:
        if args.speed is not None:
            raise UsageError(f"job {args.verb} takes no SPEED")
        arguments = {"id": args.job_id}
    return asyncio.run(_job(args.qmp, _VERBS[args.verb], arguments))


async def _job(path: str, command: str, arguments: dict[str, Any]) -> int:
    async with connect(path) as client:
        await execute(client, command, arguments)
    return EXIT_OK


def run_jobs(args: argparse.Namespace) -> int:
    return asyncio.run(_jobs(args.qmp, args.json))


async def _jobs(path: str, as_json: bool) -> int:
    async with connect(path) as client:
        jobs: list[dict[str, Any]] = await execute(client, "query-jobs")
        block_jobs: list[dict[str, Any]] = await execute(client, "query-block-jobs")
    speeds = {job["device"]: job.get("speed", 0) for job in block_jobs}
    rows = [{**job, "speed": speeds.get(job["id"], 0)} for job in jobs]
    if as_json:
        print(json.dumps(rows))
        return EXIT_OK
    print(_table(rows))
    return EXIT_OK


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[dict[str, Any]]) -> str:
    """The jobs as aligned columns: ID, TYPE, STATUS (with the error, if any), PROGRESS, SPEED."""
    lines: list[tuple[str, ...]] = [("ID", "TYPE", "STATUS", "PROGRESS", "SPEED")]
    for row in rows:
        current, total = row.get("current-progress", 0), row.get("total-progress", 0)
        percent = 100.0 * current / total if total else 100.0
        progress = f"{percent:.1f}% ({_human(current)} / {_human(total)})"
        speed = f"{_human(row['speed'])}/s" if row["speed"] else "unlimited"
        status = row["status"] + (f" ({row['error']})" if "error" in row else "")
        lines.append((row["id"], row["type"], status, progress, speed))
    return columns(lines)


def columns(lines: list[tuple[str, ...]]) -> str:
    """Rows as aligned columns, two spaces apart; the last column is not padded."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[-1]])
        for line in lines
    )


# ---------------------------------------------------------------------------------- backup --qmp


def target_node_name(job_id: str) -> str:
    """The target's node name: ``<job-id>-target``, or a digest of the job id when that is too long."""
    name = f"{job_id}-target"
    if len(name) <= _MAX_NODE_NAME:
        return name
    return "target-" + hashlib.sha1(job_id.encode()).hexdigest()[:16]


def run_backup(args: argparse.Namespace) -> int:
    """``cowbackup backup --qmp SOCKET NODE TARGET``: a live backup by a running daemon."""
    job_id = args.job_id or f"backup-{args.source}"
    if not is_wellformed_id(job_id):
        raise UsageError(f"invalid job id '{job_id}' (a letter, then letters, digits, '-', '.' or '_')")
    if args.cluster_size and (args.cluster_size < 65536 or args.cluster_size & (args.cluster_size - 1)):
        raise UsageError(f"--cluster-size must be a power of two of at least 64K, not {args.cluster_size}")
    _sync_arguments(args)  # usage errors before anything is created
    # The daemon opens TARGET from its own working directory.
    target = args.target if is_nbd_uri(args.target) else os.path.abspath(args.target)
    return asyncio.run(_live_backup(args, job_id, target))


def _perf(args: argparse.Namespace) -> dict[str, Any]:
    """``x-perf`` for the options given explicitly (qemu-storage-daemon 7.2 knows all but the cluster)."""
    perf: dict[str, Any] = {}
    if args.copy_range:
        perf["use-copy-range"] = True
    if args.workers != 64:
        perf["max-workers"] = args.workers
    if args.max_chunk:
        perf["max-chunk"] = args.max_chunk
    if args.cluster_size:
        perf["min-cluster-size"] = args.cluster_size
    return perf


async def query_node(client: QMPClient, name: str) -> dict[str, Any]:
    """The ``query-named-block-nodes`` entry of ``name``; CliError if the daemon has no such node."""
    nodes: list[dict[str, Any]] = await execute(client, "query-named-block-nodes", {"flat": True})
    for node in nodes:
        if node.get("node-name") == name:
            return node
    raise CliError(f"the daemon has no block node named '{name}'")


async def _live_backup(args: argparse.Namespace, job_id: str, target: str) -> int:
    reporter = make_reporter(args.json)
    node_name = target_node_name(job_id)
    interrupted: list[int] = []
    async with connect(args.qmp) as client:
        listener = EventListener(JOB_EVENTS)
        with client.listen(listener):
            source = await query_node(client, args.source)
            size = source["image"]["virtual-size"]
            try:
                options = target_options(target, size, args.force, args.target_format, args.backing_file)
            except BlockError as err:
                raise UsageError(str(err)) from None
            if options["driver"] == "file":
                options["discard"] = "unmap"  # zeros become holes, as in the one-shot path
            await execute(client, "blockdev-add", {**options, "node-name": node_name})
            try:
                if is_nbd_uri(target):
                    info = await query_node(client, node_name)
                    check_nbd_target(target, info["image"]["virtual-size"], size, info["ro"])
                backup: dict[str, Any] = {
                    "job-id": job_id,
                    "device": args.source,
                    "target": node_name,
                    **_sync_arguments(args),
                    "speed": args.speed,
                    "auto-finalize": True,
                    "auto-dismiss": True,
                }
                if perf := _perf(args):
                    backup["x-perf"] = perf
                # Until here Ctrl-C is a KeyboardInterrupt (exit 130, the target node removed); from
                # here on a signal must cancel the job first.
                with signals_to(interrupted):
                    started = time.monotonic()
                    fallback = _fallback_actions(args, source, backup)
                    if fallback is None:
                        await execute(client, "blockdev-backup", backup)
                    else:
                        if any(e.get("name") == args.bitmap for e in source.get("dirty-bitmaps", [])):
                            ref = {"node": args.source, "name": args.bitmap}
                            await execute(client, "block-dirty-bitmap-remove", ref)
                        await execute(client, "transaction", {"actions": fallback})
                    outcome = await follow_job(client, listener, job_id, size, reporter, interrupted)
                    elapsed = time.monotonic() - started
            finally:
                await blockdev_del_quietly(client, node_name)
    if interrupted:
        name = signal.Signals(interrupted[0]).name
        raise CliError(f"interrupted by {name}: backup cancelled, '{target}' is incomplete", EXIT_INTERRUPTED)
    if outcome.get("event") != "BLOCK_JOB_COMPLETED":
        raise CliError(f"backup failed: job '{job_id}' was cancelled", EXIT_FAILED)
    if "error" in outcome:
        raise CliError(f"backup failed: {outcome['error']}", EXIT_FAILED)
    args.target = target  # summary stats the file the daemon wrote
    summary(args, reporter, int(outcome.get("len", 0)), elapsed)
    return EXIT_OK


@contextlib.contextmanager
def signals_to(received: list[int]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM only append their number to ``received`` (the first one)."""
    loop = asyncio.get_running_loop()

    def note(signum: int) -> None:
        if not received:
            received.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, note, signum)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def blockdev_del_quietly(client: QMPClient, node_name: str) -> None:
    """Remove the target node; a failure is a warning (the backup's own outcome decides the status)."""
    try:
        await execute(client, "blockdev-del", {"node-name": node_name})
    except CliError as err:
        sys.stderr.write(f"cowbackup: warning: could not remove target node '{node_name}': {err.message}\n")


async def follow_job(
    client: QMPClient,
    listener: EventListener,
    job_id: str,
    size: int,
    reporter: Reporter,
    interrupted: list[int],
) -> dict[str, Any]:
    """Show the job's progress until it is gone; return its last BLOCK_JOB_COMPLETED/_CANCELLED data."""
    outcomes = await follow_jobs(client, listener, [job_id], size, reporter, interrupted)
    return outcomes.get(job_id, {})


async def follow_jobs(
    client: QMPClient,
    listener: EventListener,
    job_ids: Sequence[str],
    size: int,
    reporter: Reporter,
    interrupted: list[int],
) -> dict[str, dict[str, Any]]:
    """Show the jobs' summed progress until every one is gone; their last BLOCK_JOB_COMPLETED/_CANCELLED
    data by job id (a job missing there ended without either).

    A job's end is JOB_STATUS_CHANGE(null) (auto-dismiss), or the job missing from ``query-jobs``: the
    events that came before that reply are already in ``listener``, so draining it then misses none.
    A signal sends ``job-cancel`` to each once, and the loop goes on until they are gone.
    """
    wanted = set(job_ids)
    outcomes: dict[str, dict[str, Any]] = {}
    gone: set[str] = set()
    cancel_sent = False

    def handle(event: Mapping[str, Any]) -> None:
        data = dict(event.get("data", {}))
        job = data.get("device") if data.get("device") in wanted else data.get("id")
        if job not in wanted:
            return
        name = str(event["event"])
        reporter.event(name, data)
        if name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            outcomes[job] = {**data, "event": name}
        elif name == "JOB_STATUS_CHANGE" and data.get("status") == "null":
            gone.add(job)

    reporter.start(job_ids[0] if len(job_ids) == 1 else f"{len(job_ids)} jobs", size)
    try:
        while gone != wanted:
            if interrupted and not cancel_sent:
                cancel_sent = True
                for job in wanted - gone:
                    with contextlib.suppress(CliError):  # the job may have ended on its own meanwhile
                        await execute(client, "job-cancel", {"id": job})
            jobs: list[dict[str, Any]] = await execute(client, "query-jobs")
            infos = [info for info in jobs if info.get("id") in wanted]
            if infos:
                current = sum(i["current-progress"] for i in infos) + sum(
                    int(o.get("offset", 0)) for j, o in outcomes.items() if j not in {i["id"] for i in infos}
                )
                reporter.update(current, max(size, sum(i["total-progress"] for i in infos)))
            while not listener.empty():
                handle(await listener.get())
            if not infos:
                break
            with contextlib.suppress(TimeoutError):
                handle(await asyncio.wait_for(listener.get(), PROGRESS_INTERVAL))
        if outcomes and all("len" in o for o in outcomes.values()):
            done = sum(int(o["offset"]) for o in outcomes.values())
            reporter.update(done, sum(int(o["len"]) for o in outcomes.values()), force=True)
    finally:
        reporter.stop()
    return outcomes
