"""Jobs: QEMU's job state machine, verbs, events and speed limit; the backup job builds on them."""

from cowbackup.jobs.events import (
    BLOCK_JOB_CANCELLED,
    BLOCK_JOB_COMPLETED,
    BLOCK_JOB_ERROR,
    BLOCK_JOB_PENDING,
    JOB_STATUS_CHANGE,
    Event,
    EventBus,
    Subscriber,
)
from cowbackup.jobs.job import (
    JOB_TRANSITIONS,
    JOB_VERBS,
    BlockdevOnError,
    DeviceNotActiveError,
    ErrorAction,
    IoStatus,
    Job,
    JobError,
    JobManager,
    JobStatus,
    JobTxn,
    JobVerb,
)
from cowbackup.jobs.ratelimit import SLICE_NS, RateLimit

__all__ = [
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_PENDING",
    "JOB_STATUS_CHANGE",
    "JOB_TRANSITIONS",
    "JOB_VERBS",
    "SLICE_NS",
    "BlockdevOnError",
    "DeviceNotActiveError",
    "ErrorAction",
    "Event",
    "EventBus",
    "IoStatus",
    "Job",
    "JobError",
    "JobManager",
    "JobStatus",
    "JobTxn",
    "JobVerb",
    "RateLimit",
    "Subscriber",
]
