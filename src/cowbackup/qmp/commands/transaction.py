"""The ``transaction`` command (qapi/transaction.json): several actions, all or none.

::

    {"execute": "transaction", "arguments": {
        "actions": [{"type": "blockdev-backup", "data": {...blockdev-backup arguments...}},
                    {"type": "abort", "data": {}}],
        "properties": {"completion-mode": "individual" | "grouped"}}}

Supported action types: ``blockdev-backup``, ``abort`` and the dirty-bitmap actions
``block-dirty-bitmap-add/remove/clear/enable/disable/merge``. QEMU's other types (snapshots,
``drive-backup``) are not in our schema and are refused as unknown values of ``type``.

As QEMU (blockdev.c ``qmp_transaction``):

1. The whole input is checked first (types, enums, unknown members; nested members named by path,
   ``actions[1].data.speed``), so a malformed later action creates nothing.
2. ``completion-mode=grouped`` needs every action to be a backup ("Action 'abort' does not support
   transaction property completion-mode = grouped"); the backups then share one ``JobTxn``: they
   finish together, and one failing or cancelled cancels the others.
3. The actions are prepared in order: a backup is created and its copy-before-write filter inserted,
   but the job is not started; a bitmap action does its work and keeps what it needs to undo it.
   Preparation never yields to the event loop, so every filter goes in and every bitmap changes within
   one loop step: a bitmap added next to a full backup records exactly the writes after its snapshot.
   ``abort`` fails with "Transaction aborted using Abort action".
4. On the first failure the prepared actions are rolled back, newest first, and that failure is the
   reply. A rolled-back job is cancelled before it started, which is what QEMU does
   (``job_cancel_sync``): ``JOB_STATUS_CHANGE`` aborting, concluded, null after its created, no
   ``BLOCK_JOB_CANCELLED``; its filter is dropped by the job's clean-up and its bitmap reclaimed. A
   bitmap action's abort puts the bitmap back as it was (an added bitmap goes, a removed one stays).
5. Otherwise every action is committed, newest first (QEMU commits its actions in reverse order): jobs
   start, removed bitmaps go. The reply is ``{}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.jobs.backup import BackupJob, BackupParams, backup_job_create
from cowbackup.jobs.job import JobError, JobStatus, JobTxn
from cowbackup.qmp.commands import (
    QMPContext,
    QMPError,
    arg_enum,
    arg_list,
    arg_obj,
    arg_str,
    command,
    no_extra,
)
from cowbackup.qmp.commands.bitmaps import (
    Undo,
    add_prepare,
    clear_prepare,
    enable_prepare,
    merge_prepare,
    parse_add,
    parse_merge,
    parse_ref,
    remove_prepare,
    store_all,
)
from cowbackup.qmp.commands.jobs import backup_params

BITMAP_ACTIONS = (
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
)
ACTION_TYPES = ("abort", *BITMAP_ACTIONS, "blockdev-backup")
COMPLETION_MODES = ("individual", "grouped")


@dataclass(frozen=True)
class _Action:
    type: str
    backup: BackupParams | None = None  # for blockdev-backup
    #: For a bitmap action: does its work on the graph and returns how to commit or undo it.
    bitmap: Callable[[BlockGraph], Undo] | None = None


def _bitmap_action(kind: str, data: dict[str, Any], path: str) -> Callable[[BlockGraph], Undo]:
    """Check a bitmap action's data now (the whole input is checked before anything runs)."""
    if kind == "block-dirty-bitmap-add":
        add = parse_add(data, path)
        return lambda graph: add_prepare(graph, add)
    if kind == "block-dirty-bitmap-merge":
        merge = parse_merge(data, path)
        return lambda graph: merge_prepare(graph, merge)
    ref = parse_ref(data, path)
    if kind == "block-dirty-bitmap-remove":
        return lambda graph: remove_prepare(graph, ref)
    if kind == "block-dirty-bitmap-clear":
        return lambda graph: clear_prepare(graph, ref)
    enable = kind == "block-dirty-bitmap-enable"
    return lambda graph: enable_prepare(graph, ref, enable)


def _parse_action(action: Any, index: int) -> _Action:
    """One element of ``actions``, checked as QEMU's input visitor checks a TransactionAction."""
    path = f"actions[{index}]"
    if not isinstance(action, dict):
        raise QMPError(f"Invalid parameter type for '{path}', expected: object")
    # The discriminator comes first; QEMU names a bad enum value without its path.
    arg_str(action, "type", prefix=path)
    kind = arg_enum(action, "type", ACTION_TYPES)
    data = arg_obj(action, "data", prefix=path)
    data_path = f"{path}.data"
    if kind == "blockdev-backup":
        parsed = _Action(kind, backup=backup_params(data, data_path))
    elif kind == "abort":
        parsed = _Action(kind)
        no_extra(data, (), prefix=data_path)
    else:
        parsed = _Action(kind, bitmap=_bitmap_action(kind, data, data_path))
    no_extra(action, ("type", "data"), prefix=path)
    return parsed


def _parse_mode(args: dict[str, Any]) -> str:
    props = arg_obj(args, "properties", None)
    if props is None:
        return "individual"
    arg_str(props, "completion-mode", None, prefix="properties")
    mode: str = arg_enum(props, "completion-mode", COMPLETION_MODES, "individual")
    no_extra(props, ("completion-mode",), prefix="properties")
    return mode


@dataclass
class _Prepared:
    """A prepared action: a backup job not started yet, or a bitmap action's undo."""

    job: BackupJob | None = None
    undo: Undo | None = None


async def _roll_back(prepared: list[_Prepared]) -> None:
    """Undo the prepared actions, newest first: bitmap actions at once; never-started jobs are
    cancelled and waited for until they are gone.

    In a grouped transaction the first cancel takes its sibling jobs down too; they are skipped then.
    """
    for action in reversed(prepared):
        if action.undo is not None:
            action.undo.abort()
            continue
        job = action.job
        assert job is not None
        if job.status != JobStatus.CREATED:
            continue
        flow = job.cancel(True)
        if flow is not None:
            await flow


@command("transaction")
async def transaction(ctx: QMPContext, args: dict[str, Any]) -> Any:
    actions = [_parse_action(action, n) for n, action in enumerate(arg_list(args, "actions"))]
    mode = _parse_mode(args)
    no_extra(args, ("actions", "properties"))
    if mode != "individual":
        for action in actions:
            if action.type != "blockdev-backup":
                raise QMPError(
                    f"Action '{action.type}' does not support transaction property completion-mode = {mode}"
                )
    txn = JobTxn() if mode == "grouped" else None

    daemon = ctx.daemon
    prepared: list[_Prepared] = []
    try:
        # No await in this loop: all filters are inserted, and all bitmaps changed, in one step of the
        # event loop.
        for action in actions:
            if action.type == "abort":
                raise QMPError("Transaction aborted using Abort action")
            if action.bitmap is not None:
                prepared.append(_Prepared(undo=action.bitmap(daemon.graph)))
                continue
            assert action.backup is not None
            prepared.append(_Prepared(job=backup_job_create(daemon.graph, daemon.jobs, action.backup, txn)))
    except (QMPError, BlockError, JobError):
        await _roll_back(prepared)
        raise
    for done in reversed(prepared):
        if done.undo is not None:
            done.undo.commit()
        elif done.job is not None:
            done.job.start()
    # Storage I/O only now, with every bitmap and job in place (it yields to the event loop).
    await store_all([done.undo for done in prepared if done.undo is not None])
    return {}
