"""Jobs: QEMU's job state machine, verbs and events; the backup job builds on them.

The speed limit a job sets, :class:`RateLimit`, is a block-layer tool (:mod:`cowbackup.block.ratelimit`,
applied by the copy engine); it is exported here too.
"""

from cowbackup.block.ratelimit import SLICE_NS, RateLimit
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
