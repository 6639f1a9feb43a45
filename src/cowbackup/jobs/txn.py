"""Transactions of jobs (QEMU's JobTxn) and the registry of a daemon's jobs (JobManager)."""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from cowbackup.jobs.events import BLOCK_JOB_PENDING, EventBus
from cowbackup.jobs.states import DeviceNotActiveError, JobError, JobStatus

if TYPE_CHECKING:
    from cowbackup.jobs.job import Job

log = logging.getLogger(__name__)


class JobTxn:
    """Jobs that finish together (QEMU's JobTxn; QMP transaction ``completion-mode=grouped``).

    A job that finishes successfully waits in ``waiting`` until every job of the transaction has
    finished; then all become ``pending`` and are finalized together (by the last one, or by
    ``finalize()`` on any of them if one has auto-finalize off). If one fails or is cancelled, the others
    are force-cancelled and every job takes the abort path. A job created without a transaction gets one
    of its own, so single jobs follow the same code.

    Jobs are kept newest first, as QEMU's list, which is the order in which they are finalized.
    """

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._finalizing = False  # a success flow has started (set synchronously, before any await)
        self._aborting = False  # an abort flow has started (likewise)

    @property
    def jobs(self) -> list[Job]:
        return list(self._jobs)

    @property
    def busy(self) -> bool:
        """A finalize or abort flow has started; the jobs' fates are decided."""
        return self._finalizing or self._aborting

    def _add(self, job: Job) -> None:
        if self.busy:
            raise AssertionError("job added to a transaction that is completing")
        self._jobs.insert(0, job)

    def _remove(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)

    def _job_completed(self, job: Job) -> Coroutine[Any, Any, None] | None:
        """``job`` finished running (or was cancelled before starting). Decides synchronously what
        happens next and returns the flow that runs the hooks, if one must run now; the caller awaits
        or spawns it."""
        job._update_rc()
        if job._ret:
            return self._run_abort() if self._begin_abort(job) else None
        job._transition(JobStatus.WAITING)
        if not all(other.is_completed() for other in self._jobs):
            return None
        for other in self._jobs:
            other._transition(JobStatus.PENDING)
            if not other.auto_finalize:
                other._emit(BLOCK_JOB_PENDING, {"type": other.type, "id": other.id})
        if not all(other.auto_finalize for other in self._jobs):
            return None
        return self._run_finalize() if self._begin_finalize() else None

    def _begin_finalize(self) -> bool:
        if self.busy:
            return False
        self._finalizing = True
        return True

    async def _run_finalize(self) -> None:
        for job in list(self._jobs):
            if not await job._prepare():
                if self._begin_abort(job):
                    await self._run_abort()
                return
        for job in list(self._jobs):
            await job._finalize_single()

    def _begin_abort(self, failed: Job) -> bool:
        if self._aborting:
            # Another job is already aborting the transaction and will take care of this one.
            return False
        self._aborting = True
        for other in self._jobs:
            if other is not failed:
                other._cancel_async(True)
        return True

    async def _run_abort(self) -> None:
        while self._jobs:
            job = self._jobs[0]
            if not job.is_completed():
                if job._started:
                    job.enter()
                    await job._run_finished.wait()
                else:
                    job._deferred = True
                    job._update_rc()
            await job._finalize_single()


class JobManager:
    """All jobs of one daemon, by id, and the event bus their events go out on.

    A job is registered when created and forgotten when it reaches ``null``.
    """

    def __init__(self, events: EventBus | None = None) -> None:
        self.events = events if events is not None else EventBus()
        self._jobs: dict[str, Job] = {}
        # Completion flows started by verbs; kept here so they are not garbage-collected mid-flight.
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def find_job(self, job_id: str) -> Job:
        """The job for ``job-*`` commands; ``JobError("Job not found")`` if none."""
        job = self._jobs.get(job_id)
        if job is None:
            raise JobError("Job not found")
        return job

    def find_block_job(self, job_id: str) -> Job:
        """The job for ``block-job-*`` commands; ``DeviceNotActiveError`` if none."""
        job = self._jobs.get(job_id)
        if job is None:
            raise DeviceNotActiveError(f"Block job '{job_id}' not found")
        return job

    def list(self) -> builtins.list[Job]:
        """Every job, newest first (QEMU's order in query-jobs and query-block-jobs)."""
        return builtins.list(reversed(self._jobs.values()))

    async def wait(self, job: Job) -> None:
        """Return once ``job`` has concluded (or been dismissed)."""
        await job.wait_concluded()

    async def cancel_all(self) -> None:
        """Cancel every job and wait until all are gone, dismissing concluded ones (shutdown, ``quit``)."""
        while self._jobs:
            job = next(iter(self._jobs.values()))
            task = job._cancel(True)
            if task is not None:
                await asyncio.shield(task)
            await job.wait_concluded()
            if job.status == JobStatus.CONCLUDED:
                job._do_dismiss()

    def _register(self, job: Job) -> None:
        self._jobs[job.id] = job

    def _unregister(self, job: Job) -> None:
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]

    def _spawn(self, flow: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(flow)
        self._tasks.add(task)
        task.add_done_callback(self._flow_done)
        return task

    def _flow_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("job completion flow failed", exc_info=task.exception())
