"""The ``transaction`` command (qapi/transaction.json): several actions, all or none.

::

    {"execute": "transaction", "arguments": {
        "actions": [{"type": "blockdev-backup", "data": {...blockdev-backup arguments...}},
                    {"type": "abort", "data": {}}],
        "properties": {"completion-mode": "individual" | "grouped"}}}

Supported action types: ``blockdev-backup`` and ``abort``. QEMU's other types (dirty-bitmap actions,
snapshots, ``drive-backup``) are not in our schema and are refused as unknown values of ``type``.

As QEMU (blockdev.c ``qmp_transaction``):

1. The whole input is checked first (types, enums, unknown members; nested members named by path,
   ``actions[1].data.speed``), so a malformed later action creates nothing.
2. ``completion-mode=grouped`` needs every action to be a backup ("Action 'abort' does not support
   transaction property completion-mode = grouped"); the backups then share one ``JobTxn``: they
   finish together, and one failing or cancelled cancels the others.
3. The actions are prepared in order: a backup is created and its copy-before-write filter inserted,
   but the job is not started. Preparation never yields to the event loop, so every filter goes in
   within one loop step and all snapshots share one instant. ``abort`` fails with "Transaction
   aborted using Abort action".
4. On the first failure the prepared backups are rolled back, newest first, and that failure is the
   reply. A rolled-back job is cancelled before it started, which is what QEMU does
   (``job_cancel_sync``): ``JOB_STATUS_CHANGE`` aborting, concluded, null after its created, no
   ``BLOCK_JOB_CANCELLED``; its filter is dropped by the job's clean-up.
5. Otherwise every job is started, newest first (QEMU commits its actions in reverse order), and the
   reply is ``{}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cowbackup.block.errors import BlockError
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
from cowbackup.qmp.commands.jobs import backup_params

ACTION_TYPES = ("abort", "blockdev-backup")
COMPLETION_MODES = ("individual", "grouped")


@dataclass(frozen=True)
class _Action:
    type: str
    backup: BackupParams | None = None  # for blockdev-backup


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
    parsed = _Action(kind, backup_params(data, data_path)) if kind == "blockdev-backup" else _Action(kind)
    if kind == "abort":
        no_extra(data, (), prefix=data_path)
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


async def _roll_back(prepared: list[BackupJob]) -> None:
    """Cancel the prepared, never-started jobs, newest first, and wait until they are gone.

    In a grouped transaction the first cancel takes its siblings down too; they are skipped then.
    """
    for job in reversed(prepared):
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
    prepared: list[BackupJob] = []
    try:
        # No await in this loop: all filters are inserted in one step of the event loop.
        for action in actions:
            if action.type == "abort":
                raise QMPError("Transaction aborted using Abort action")
            assert action.backup is not None
            prepared.append(backup_job_create(daemon.graph, daemon.jobs, action.backup, txn))
    except (QMPError, BlockError, JobError):
        await _roll_back(prepared)
        raise
    for job in reversed(prepared):
        job.start()
    return {}
