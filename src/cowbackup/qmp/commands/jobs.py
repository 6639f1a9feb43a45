"""Job commands (qapi/block-core.json, qapi/job.json): blockdev-backup and the job verbs.

``block-job-*`` name the job ``device`` and report an unknown one as ``DeviceNotActive``;
``job-*`` name it ``id`` and report ``GenericError "Job not found"`` (JobManager does both).

Replies follow the events a verb causes, as in QEMU: a cancel's abort flow and a finalize run to
their end (events included) before the reply is queued.
"""

from __future__ import annotations

from typing import Any

from cowbackup.jobs.backup import BackupParams, BackupPerf
from cowbackup.jobs.job import Job
from cowbackup.jobs.states import BlockdevOnError
from cowbackup.qmp.commands import (
    QMPContext,
    arg_bool,
    arg_enum,
    arg_int,
    arg_obj,
    arg_str,
    command,
    no_extra,
)

_SYNC_MODES = ("top", "full", "none", "incremental", "bitmap")
_BITMAP_MODES = ("on-success", "never", "always")
_ON_ERROR = tuple(policy.value for policy in BlockdevOnError)
_ON_CBW_ERROR = ("break-guest-write", "break-snapshot")
_PERF_KEYS = ("use-copy-range", "max-workers", "max-chunk", "min-cluster-size")
# BackupCommon's members in schema order (QEMU reports the first bad one), then BlockdevBackup's.
_BACKUP_KEYS = (
    "job-id",
    "device",
    "sync",
    "speed",
    "bitmap",
    "bitmap-mode",
    "compress",
    "on-source-error",
    "on-target-error",
    "auto-finalize",
    "auto-dismiss",
    "filter-node-name",
    "discard-source",
    "x-perf",
    "on-cbw-error",
    "target",
)


def _enum(args: dict[str, Any], key: str, choices: tuple[str, ...], prefix: str, *default: Any) -> Any:
    """An enum member: missing or not a string is reported with its path (``prefix``), a bad value
    with the bare member name, as QEMU's input visitor does."""
    arg_str(args, key, *default, prefix=prefix)
    return arg_enum(args, key, choices, *default)


def _perf(args: dict[str, Any], prefix: str) -> BackupPerf:
    perf = arg_obj(args, "x-perf", None, prefix=prefix)
    if perf is None:
        return BackupPerf()
    default = BackupPerf()
    p = f"{prefix}.x-perf" if prefix else "x-perf"
    result = BackupPerf(
        use_copy_range=arg_bool(perf, "use-copy-range", default.use_copy_range, prefix=p),
        max_workers=arg_int(perf, "max-workers", default.max_workers, prefix=p),
        max_chunk=arg_int(perf, "max-chunk", default.max_chunk, prefix=p),
        min_cluster_size=arg_int(perf, "min-cluster-size", default.min_cluster_size, prefix=p),
    )
    no_extra(perf, _PERF_KEYS, prefix=p)
    return result


def backup_params(args: dict[str, Any], prefix: str = "") -> BackupParams:
    """Check ``blockdev-backup`` arguments (types, enums, unknown members) into BackupParams.

    ``prefix`` names the object in messages when it is nested (``transaction``'s
    ``actions[0].data``): "Invalid parameter type for 'actions[0].data.speed', ...". QEMU's enum
    errors name the bare member ("Parameter 'sync' does not accept value 'x'") at any depth, so the
    enums are read without it. Semantic checks (bitmap rules, speed < 0, same node...) are the job
    layer's, in QEMU's order.
    """
    job_id = arg_str(args, "job-id", None, prefix=prefix)
    device = arg_str(args, "device", prefix=prefix)
    sync = _enum(args, "sync", _SYNC_MODES, prefix)
    speed = arg_int(args, "speed", 0, prefix=prefix)
    bitmap = arg_str(args, "bitmap", None, prefix=prefix)
    bitmap_mode = _enum(args, "bitmap-mode", _BITMAP_MODES, prefix, None)
    compress = arg_bool(args, "compress", False, prefix=prefix)
    on_source_error = _enum(args, "on-source-error", _ON_ERROR, prefix, "report")
    on_target_error = _enum(args, "on-target-error", _ON_ERROR, prefix, "report")
    auto_finalize = arg_bool(args, "auto-finalize", True, prefix=prefix)
    auto_dismiss = arg_bool(args, "auto-dismiss", True, prefix=prefix)
    filter_node_name = arg_str(args, "filter-node-name", None, prefix=prefix)
    discard_source = arg_bool(args, "discard-source", False, prefix=prefix)
    perf = _perf(args, prefix)
    on_cbw_error = _enum(args, "on-cbw-error", _ON_CBW_ERROR, prefix, "break-guest-write")
    target = arg_str(args, "target", prefix=prefix)
    no_extra(args, _BACKUP_KEYS, prefix=prefix)
    return BackupParams(
        device=device,
        target=target,
        sync=sync,
        job_id=job_id,
        speed=speed,
        bitmap=bitmap,
        bitmap_mode=bitmap_mode,
        compress=compress,
        on_source_error=BlockdevOnError(on_source_error),
        on_target_error=BlockdevOnError(on_target_error),
        on_cbw_error=on_cbw_error,
        auto_finalize=auto_finalize,
        auto_dismiss=auto_dismiss,
        filter_node_name=filter_node_name,
        discard_source=discard_source,
        perf=perf,
    )


@command("blockdev-backup")
async def blockdev_backup(ctx: QMPContext, args: dict[str, Any]) -> Any:
    ctx.daemon.blockdev_backup(backup_params(args))
    return {}


@command("query-block-jobs")
async def query_block_jobs(ctx: QMPContext, args: dict[str, Any]) -> Any:
    no_extra(args, ())
    return [job.block_job_info() for job in ctx.daemon.jobs.list()]


@command("query-jobs")
async def query_jobs(ctx: QMPContext, args: dict[str, Any]) -> Any:
    no_extra(args, ())
    return [job.job_info() for job in ctx.daemon.jobs.list()]


# ------------------------------------------------------------------------------------ verbs


def _job(ctx: QMPContext, args: dict[str, Any]) -> Job:
    job_id = arg_str(args, "id")
    no_extra(args, {"id"})
    return ctx.daemon.jobs.find_job(job_id)


async def _cancel(job: Job, force: bool) -> None:
    flow = job.cancel(force)
    if flow is not None:
        await flow  # the abort flow's events precede the reply, as in QEMU


@command("block-job-set-speed")
async def block_job_set_speed(ctx: QMPContext, args: dict[str, Any]) -> Any:
    device = arg_str(args, "device")
    speed = arg_int(args, "speed")
    no_extra(args, {"device", "speed"})
    ctx.daemon.jobs.find_block_job(device).set_speed(speed)
    return {}


@command("block-job-cancel")
async def block_job_cancel(ctx: QMPContext, args: dict[str, Any]) -> Any:
    device = arg_str(args, "device")
    force = arg_bool(args, "force", False)
    no_extra(args, {"device", "force"})
    await _cancel(ctx.daemon.jobs.find_block_job(device), force)
    return {}


@command("block-job-pause")
async def block_job_pause(ctx: QMPContext, args: dict[str, Any]) -> Any:
    device = arg_str(args, "device")
    no_extra(args, {"device"})
    ctx.daemon.jobs.find_block_job(device).pause()
    return {}


@command("block-job-resume")
async def block_job_resume(ctx: QMPContext, args: dict[str, Any]) -> Any:
    device = arg_str(args, "device")
    no_extra(args, {"device"})
    ctx.daemon.jobs.find_block_job(device).resume()
    return {}


@command("block-job-complete")
async def block_job_complete(ctx: QMPContext, args: dict[str, Any]) -> Any:
    device = arg_str(args, "device")
    no_extra(args, {"device"})
    ctx.daemon.jobs.find_block_job(device).complete()
    return {}


@command("block-job-finalize")
async def block_job_finalize(ctx: QMPContext, args: dict[str, Any]) -> Any:
    job_id = arg_str(args, "id")
    no_extra(args, {"id"})
    await ctx.daemon.jobs.find_block_job(job_id).finalize()
    return {}


@command("block-job-dismiss")
async def block_job_dismiss(ctx: QMPContext, args: dict[str, Any]) -> Any:
    job_id = arg_str(args, "id")
    no_extra(args, {"id"})
    ctx.daemon.jobs.find_block_job(job_id).dismiss()
    return {}


@command("job-pause")
async def job_pause(ctx: QMPContext, args: dict[str, Any]) -> Any:
    _job(ctx, args).pause()
    return {}


@command("job-resume")
async def job_resume(ctx: QMPContext, args: dict[str, Any]) -> Any:
    _job(ctx, args).resume()
    return {}


@command("job-cancel")
async def job_cancel(ctx: QMPContext, args: dict[str, Any]) -> Any:
    await _cancel(_job(ctx, args), True)
    return {}


@command("job-complete")
async def job_complete(ctx: QMPContext, args: dict[str, Any]) -> Any:
    _job(ctx, args).complete()
    return {}


@command("job-finalize")
async def job_finalize(ctx: QMPContext, args: dict[str, Any]) -> Any:
    await _job(ctx, args).finalize()
    return {}


@command("job-dismiss")
async def job_dismiss(ctx: QMPContext, args: dict[str, Any]) -> Any:
    _job(ctx, args).dismiss()
    return {}
