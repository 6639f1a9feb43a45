"""QEMU's job states, verbs, their tables, and the errors job verbs raise (job.c's JobSTT/JobVerbTable)."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class JobError(Exception):
    """A job verb or lookup was refused; ``str(err)`` is QEMU's message, ``qmp_class`` its error class."""

    qmp_class: ClassVar[str] = "GenericError"


class DeviceNotActiveError(JobError):
    """``block-job-*`` named a job that does not exist."""

    qmp_class: ClassVar[str] = "DeviceNotActive"


class JobStatus(StrEnum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    CHANGE = "change"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


class BlockdevOnError(StrEnum):
    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


class ErrorAction(StrEnum):
    REPORT = "report"
    IGNORE = "ignore"
    STOP = "stop"


class IoStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


_S = JobStatus

# QEMU's JobSTT: from -> the states it may move to.
JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    _S.UNDEFINED: frozenset({_S.CREATED}),
    _S.CREATED: frozenset({_S.RUNNING, _S.ABORTING, _S.NULL}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.READY, _S.WAITING, _S.ABORTING}),
    _S.PAUSED: frozenset({_S.RUNNING}),
    _S.READY: frozenset({_S.STANDBY, _S.WAITING, _S.ABORTING}),
    _S.STANDBY: frozenset({_S.READY}),
    _S.WAITING: frozenset({_S.PENDING, _S.ABORTING}),
    _S.PENDING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.ABORTING: frozenset({_S.ABORTING, _S.CONCLUDED}),
    _S.CONCLUDED: frozenset({_S.NULL}),
    _S.NULL: frozenset(),
}

LIVE_STATES = frozenset({_S.CREATED, _S.RUNNING, _S.PAUSED, _S.READY, _S.STANDBY})

# QEMU's JobVerbTable: verb -> the states that accept it.
JOB_VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: LIVE_STATES | {_S.WAITING, _S.PENDING},
    JobVerb.PAUSE: LIVE_STATES,
    JobVerb.RESUME: LIVE_STATES,
    JobVerb.SET_SPEED: LIVE_STATES,
    JobVerb.CHANGE: LIVE_STATES,
    JobVerb.COMPLETE: frozenset({_S.READY, _S.STANDBY}),
    JobVerb.FINALIZE: frozenset({_S.PENDING}),
    JobVerb.DISMISS: frozenset({_S.CONCLUDED}),
}
