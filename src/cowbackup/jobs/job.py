"""QEMU's job layer (job.c, blockjob.c): the job state machine, verbs, pause/cancel, progress, transactions.

States and transitions (``JOB_TRANSITIONS``) and which verbs each state accepts (``JOB_VERBS``) are QEMU's
tables. The normal lives of a backup job, as ``JOB_STATUS_CHANGE`` statuses::

    success     created -> running [-> paused -> running]* -> waiting -> pending -> concluded -> null
    failure     created -> running -> aborting -> concluded -> null     BLOCK_JOB_COMPLETED{error}
    cancel      created -> running -> aborting -> concluded -> null     BLOCK_JOB_CANCELLED
                (from waiting or pending: ... -> aborting -> ...)

``pending`` waits for ``finalize()`` when auto-finalize is off (``BLOCK_JOB_PENDING`` is sent); ``concluded``
waits for ``dismiss()`` when auto-dismiss is off.

Who runs what (one asyncio loop owns everything, as QEMU's main loop):

* the job's own task runs ``run()``; the job only stops for a pause or notices a cancel at its pause points
  (``pause_point()``, ``sleep()``, ``yield_()``), exactly like a QEMU job coroutine;
* when ``run()`` returns, the job's transaction (``JobTxn``; a job without one gets its own) decides what is
  next. Every state decision is made synchronously; only the hooks (``prepare``/``commit``/``abort``/
  ``clean``) are awaited. A transaction runs one completion flow at a time (finalize or abort); verbs that
  would start a second one while it runs are accepted and ignored.

Errors::

    JobError                 a verb refused (QMP class GenericError); message is QEMU's
     +-- DeviceNotActiveError  block-job-* on an unknown id (QMP class DeviceNotActive)

An illegal state transition is a bug in this module or a subclass and raises ``AssertionError``.

This module holds ``Job``, the transaction that decides how it completes (``JobTxn``) and the registry
of a daemon's jobs (``JobManager``) -- as QEMU's job.c does: the three call into each other's internals at
every step of a job's life, so they are one role in one module.  The pause requests and pause points are
in ``pausepoints.py`` (a mixin), the state and verb tables and the errors in ``states.py``, the events in
``events.py``; the names in ``__all__`` can be imported from here.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import errno
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from cowbackup.ids import is_wellformed_id
from cowbackup.jobs.events import (
    BLOCK_JOB_CANCELLED,
    BLOCK_JOB_COMPLETED,
    BLOCK_JOB_ERROR,
    BLOCK_JOB_PENDING,
    JOB_STATUS_CHANGE,
    Event,
    EventBus,
)
from cowbackup.jobs.pausepoints import JobPausePoints
from cowbackup.jobs.states import (
    JOB_TRANSITIONS,
    JOB_VERBS,
    BlockdevOnError,
    DeviceNotActiveError,
    ErrorAction,
    IoStatus,
    JobError,
    JobStatus,
    JobVerb,
)

__all__ = [
    "JOB_TRANSITIONS",
    "JOB_VERBS",
    "BlockdevOnError",
    "DeviceNotActiveError",
    "ErrorAction",
    "IoStatus",
    "Job",
    "JobError",
    "JobManager",
    "JobStatus",
    "JobTxn",
    "JobVerb",
]

log = logging.getLogger(__name__)


# QEMU's job_is_completed(): run() has returned (or never will).
_S = JobStatus
_COMPLETED = frozenset({_S.WAITING, _S.PENDING, _S.ABORTING, _S.CONCLUDED, _S.NULL})


def _describe(err: BaseException) -> tuple[int, str]:
    """(errno, message) for a failure, the way QEMU reports ``-errno``: "Input/output error".

    Only the errno's text: our errors carry details (node, offset) that belong in the log, not in
    BLOCK_JOB_COMPLETED, whose ``error`` clients compare with QEMU's.
    """
    if isinstance(err, OSError) and err.errno:
        return err.errno, os.strerror(err.errno)
    return errno.EIO, str(err) or type(err).__name__


class Job(JobPausePoints, abc.ABC):
    """One long-running operation with QEMU's lifecycle. Subclasses implement ``run()``.

    Hooks a subclass may override (QEMU's JobDriver):

    * ``async run()`` -- the work. Raise to fail (``OSError`` with an errno: the error message becomes
      ``os.strerror(errno)``, e.g. "Input/output error"). Call ``pause_point()``/``sleep()``/``yield_()``
      often; they are where the job pauses, and they return at once when the job is cancelled, after which
      ``run()`` should stop soon, by returning or by raising ``asyncio.CancelledError`` (either way the job
      ends cancelled).
    * ``async prepare()`` -- may fail by raising; ``async commit()`` on success, ``async abort()`` on failure
      or cancel, then always ``async clean()``. commit/abort/clean must not fail: an exception is logged
      and ignored. Order: success prepare -> commit -> clean; failure/cancel abort -> clean.
    * ``async on_pause()`` / ``async on_resume()`` -- run in the job's task at a pause point that pauses,
      before the job is reported ``paused`` and after it runs again (``on_resume`` also runs when the pause
      was withdrawn before it took effect, as QEMU's). The backup job stops its copy call in ``on_pause``.
    * ``on_set_speed(speed)`` (sync) -- a new speed was accepted; ``self.speed`` already holds it.
    * ``on_cancel(force)`` (sync) -- called when cancel is requested, before the job is woken; use it to
      abort requests that could otherwise hang (QEMU's bdrv_cancel_in_flight). Cancel is always forced.

    Subclasses read ``self.speed`` when ``run()`` starts; ``on_set_speed`` is not called for the initial
    speed. All methods must be called on the loop that owns the job.
    """

    def __init__(
        self,
        job_id: str,
        job_type: str,
        manager: JobManager,
        *,
        speed: int = 0,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        txn: JobTxn | None = None,
    ) -> None:
        """Register a new job in ``manager`` with status ``created``; ``start()`` runs it.

        Raises ``JobError`` for an ill-formed or duplicate id or a negative speed; nothing is registered
        then.  A negative speed is refused as QEMU refuses it: the job is created and dropped at once, so
        its ``created`` and ``null`` status changes are sent before the error.
        """
        if not is_wellformed_id(job_id):
            raise JobError(f"Invalid job ID '{job_id}'")
        if manager.get(job_id) is not None:
            raise JobError(f"Job ID '{job_id}' already in use")
        if speed < 0:
            for status in (JobStatus.CREATED, JobStatus.NULL):
                manager.events.emit(Event(JOB_STATUS_CHANGE, {"id": job_id, "status": status.value}))
            raise JobError("Parameter 'speed' expects a non-negative value")
        self.id = job_id
        self.type = job_type
        self.manager = manager
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.speed = speed
        self.progress_current = 0
        self.progress_total = 0
        self.log = log.getChild(job_id)

        # All fields below are touched only on the owning loop; the comments say who changes them.
        self._status = JobStatus.UNDEFINED  # _transition() only
        # Pause requests (user and internal); a created job counts one, dropped by start(), as QEMU's.
        self._pause_count = 1
        self._user_paused = False  # pause()/resume(), error_action(), cancel
        self._paused = True  # the task sits in a pause point (or was never started)
        self._busy = False  # the task is running rather than parked in _do_yield()
        self._started = False
        self._cancelled = False
        self._deferred = False  # run() has returned (QEMU's deferred_to_main_loop)
        self._ret = 0  # errno of the failure, ECANCELED when cancelled; 0 = success so far
        self._error: str | None = None
        self._io_status = IoStatus.OK
        self._wakeup: asyncio.Future[None] | None = None  # set while parked in _do_yield()
        self._timer: asyncio.TimerHandle | None = None  # the sleep timer, while one is pending
        self._task: asyncio.Task[None] | None = None
        self._run_finished = asyncio.Event()  # run() returned and its completion was registered
        self._concluded = asyncio.Event()  # status is concluded or null

        self.txn = txn if txn is not None else JobTxn()
        self.txn._add(self)
        # Registered before the "created" event, so that a subscriber can already look the job up.
        manager._register(self)
        self._transition(JobStatus.CREATED)

    # ------------------------------------------------------------------ subclass interface

    @abc.abstractmethod
    async def run(self) -> None:
        """Do the job's work; see the class docstring for the contract."""

    async def prepare(self) -> None:  # optional hook
        """First finalization step on success; raise to turn success into failure."""

    async def commit(self) -> None:  # optional hook
        """Make the result permanent (the whole transaction succeeded)."""

    async def abort(self) -> None:  # optional hook
        """Undo after failure or cancel (of this job or of a transaction sibling)."""

    async def clean(self) -> None:  # optional hook
        """Release resources; runs after commit or abort."""

    # on_pause() and on_resume() are with the pause points they serve, in JobPausePoints.

    def on_set_speed(self, speed: int) -> None:  # optional hook
        """A new speed was accepted."""

    def on_cancel(self, force: bool) -> None:  # optional hook
        """Cancel was requested; wake anything the job may be blocked on outside its pause points."""

    # ------------------------------------------------------------------ state

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def busy(self) -> bool:
        """True unless the job's task is parked (sleeping, yielding or paused); QEMU's ``busy``."""
        return self._busy

    @property
    def paused(self) -> bool:
        """A pause is requested (``paused`` in query-block-jobs), whether or not it took effect yet."""
        return self._pause_count > 0

    @property
    def user_paused(self) -> bool:
        return self._user_paused

    @property
    def io_status(self) -> IoStatus:
        return self._io_status

    @property
    def error(self) -> str | None:
        """The failure message (also "Operation canceled" after cancel), or None."""
        return self._error if self._ret else None

    def is_cancelled(self) -> bool:
        return self._cancelled

    def is_completed(self) -> bool:
        """``run()`` has finished (or will never run): waiting, pending, aborting, concluded, null."""
        return self._status in _COMPLETED

    def apply_verb(self, verb: JobVerb) -> None:
        """Raise ``JobError`` unless the current status accepts ``verb`` (QEMU's job_apply_verb)."""
        if self._status not in JOB_VERBS[verb]:
            raise JobError(
                f"Job '{self.id}' in state '{self._status.value}' cannot accept command verb '{verb.value}'"
            )

    def _transition(self, new: JobStatus) -> None:
        old = self._status
        if new not in JOB_TRANSITIONS[old]:
            raise AssertionError(f"job '{self.id}': illegal status transition {old.value} -> {new.value}")
        self._status = new
        if new != old:
            self.log.debug("status %s -> %s", old.value, new.value)
            # Emitted before any other coroutine can run, so nobody sees the new status without the event.
            self._emit(JOB_STATUS_CHANGE, {"id": self.id, "status": new.value})
        if new in (JobStatus.CONCLUDED, JobStatus.NULL):
            self._concluded.set()
        if new == JobStatus.NULL:
            self.manager._unregister(self)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self.manager.events.emit(Event(name, data))

    # ------------------------------------------------------------------ progress

    def progress_update(self, done: int) -> None:
        """``done`` more bytes are finished."""
        self.progress_current += done

    def progress_set_remaining(self, remaining: int) -> None:
        """``remaining`` bytes are left: total = current + remaining (total may shrink)."""
        self.progress_total = self.progress_current + remaining

    def progress_increase_remaining(self, delta: int) -> None:
        self.progress_total += delta

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start ``run()`` in a new task on the running loop: created -> running."""
        if self._started or self._status != JobStatus.CREATED:
            raise AssertionError(f"job '{self.id}' started twice or after cancel ({self._status.value})")
        self._started = True
        self._pause_count -= 1
        self._busy = True
        self._paused = False
        self._transition(JobStatus.RUNNING)
        self._task = asyncio.get_running_loop().create_task(self._co_entry(), name=f"job {self.id}")

    async def _co_entry(self) -> None:
        try:
            # Every job may be paused before it does anything (QEMU: job_co_entry).
            await self.pause_point()
            if not self._cancelled:
                await self.run()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Nobody but the job should cancel its task; treat it as a forced cancel and still run
                # the abort path, so the job's resources are released.
                task.uncancel()
            self._cancelled = True
        except Exception as err:
            self._ret, self._error = _describe(err)
            if isinstance(err, OSError):
                self.log.info("job failed: %s", err)
            else:
                self.log.exception("job failed with an unexpected exception")
        self._deferred = True
        # Not quite true while the completion hooks run, but the job can no longer be woken (QEMU does
        # the same in job_exit()).
        self._busy = False
        flow = self.txn._job_completed(self)
        self._run_finished.set()
        if flow is not None:
            await flow

    async def wait_concluded(self) -> None:
        """Return once the status is concluded or null (at once if it already is)."""
        await self._concluded.wait()

    # ------------------------------------------------------------------ verbs

    def pause(self) -> None:
        """User pause (job-pause): the job pauses at its next pause point. Raises JobError if refused."""
        self.apply_verb(JobVerb.PAUSE)
        if self._user_paused:
            raise JobError("Job is already paused")
        self._user_paused = True
        self.pause_internal()

    def resume(self) -> None:
        """User resume (job-resume); also clears ``io_status``. Raises JobError if not user-paused."""
        # QEMU checks "not paused" before the verb table, so a concluded job gets this message too.
        if not self._user_paused or self._pause_count <= 0:
            raise JobError("Can't resume a job that was not paused")
        self.apply_verb(JobVerb.RESUME)
        self._io_status = IoStatus.OK
        self._user_paused = False
        self.resume_internal()

    def set_speed(self, speed: int) -> None:
        """block-job-set-speed: store ``speed`` (bytes/s, 0 = unlimited), tell the subclass, and wake a
        sleeping job if the limit was raised or removed."""
        self.apply_verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        old = self.speed
        self.speed = speed
        self.on_set_speed(speed)
        if speed and speed <= old:
            return
        self._enter_cond(lambda: self._timer is not None)

    def cancel(self, force: bool = True) -> asyncio.Task[None] | None:
        """job-cancel / block-job-cancel. Cancel is always forced (as backup's); ``force`` is passed on
        to ``on_cancel``.

        A running or paused job is woken and ends at its next pause point (aborting -> concluded).
        A job that already finished running (waiting, pending) or never started goes down the abort
        path at once, in a task that is returned: QEMU completes that path before job-cancel returns,
        so a caller wanting QEMU's ordering awaits it. Returns None otherwise.
        """
        self.apply_verb(JobVerb.CANCEL)
        return self._cancel(force)

    def _cancel(self, force: bool) -> asyncio.Task[None] | None:
        if self._status == JobStatus.CONCLUDED:
            self._do_dismiss()
            return None
        if self._status == JobStatus.NULL:
            return None
        if self._deferred and self.txn.busy:
            # The transaction is already finalizing or aborting this job; nothing left to cancel.
            return None
        self._cancel_async(force)
        if not self._started:
            self._deferred = True
            self._busy = False
            flow = self.txn._job_completed(self)
            return None if flow is None else self.manager._spawn(flow)
        if self._deferred:
            if self.txn._begin_abort(self):
                return self.manager._spawn(self.txn._run_abort())
            return None
        self._enter_cond(None)
        return None

    def _cancel_async(self, force: bool) -> None:
        try:
            self.on_cancel(force)
        except Exception:
            self.log.exception("on_cancel failed")
        if self._user_paused:
            # The user's pause is void once cancelled; the caller wakes the job.
            self._io_status = IoStatus.OK
            self._user_paused = False
            self._pause_count -= 1
        self._cancelled = True

    def complete(self) -> None:
        """job-complete: refused, backup-like jobs never become ready."""
        self.apply_verb(JobVerb.COMPLETE)
        raise JobError(f"The active block job '{self.id}' cannot be completed")

    async def finalize(self) -> None:
        """job-finalize: finalize this job's whole transaction; returns when this job has concluded."""
        self.apply_verb(JobVerb.FINALIZE)
        if self.txn._begin_finalize():
            self.manager._spawn(self.txn._run_finalize())
        await self.wait_concluded()

    def dismiss(self) -> None:
        """job-dismiss: concluded -> null; the job is forgotten."""
        self.apply_verb(JobVerb.DISMISS)
        self._do_dismiss()

    def early_fail(self) -> None:
        """Drop a job that was created but cannot be started (its creator failed later): created -> null."""
        if self._status != JobStatus.CREATED:
            raise AssertionError(f"job '{self.id}': early_fail in state {self._status.value}")
        self._do_dismiss()

    def _do_dismiss(self) -> None:
        self._busy = False
        self._paused = False
        self._deferred = True
        self.txn._remove(self)
        self._transition(JobStatus.NULL)

    # ------------------------------------------------------------------ errors

    def error_action(self, policy: BlockdevOnError, is_read: bool, err: OSError) -> ErrorAction:
        """Apply an ``on-source-error``/``on-target-error`` policy to a failed read or write.

        ``enospc``/``auto`` stop on ENOSPC and report otherwise. Sends ``BLOCK_JOB_ERROR``. For ``stop``
        the job becomes user-paused (it pauses at its next pause point; ``resume()`` continues it) and
        ``io_status`` becomes ``nospace``/``failed``. The caller fails the job for ``report`` and retries
        for ``ignore`` and, after the pause, for ``stop``.
        """
        if policy in (BlockdevOnError.ENOSPC, BlockdevOnError.AUTO):
            action = ErrorAction.STOP if err.errno == errno.ENOSPC else ErrorAction.REPORT
        else:
            action = ErrorAction(policy.value)
        self._emit(
            BLOCK_JOB_ERROR,
            {"device": self.id, "operation": "read" if is_read else "write", "action": action.value},
        )
        if action == ErrorAction.STOP:
            if not self._user_paused:
                self.pause_internal()
                self._user_paused = True
            if self._io_status == IoStatus.OK:
                self._io_status = IoStatus.NOSPACE if err.errno == errno.ENOSPC else IoStatus.FAILED
        return action

    # ------------------------------------------------------------------ completion (driven by JobTxn)

    def _update_rc(self) -> None:
        if not self._ret and self._cancelled:
            self._ret = errno.ECANCELED
        if self._ret:
            if self._error is None:
                self._error = os.strerror(self._ret)
            self._transition(JobStatus.ABORTING)

    async def _run_hook(self, name: str, hook: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await hook()
        except Exception:
            self.log.exception("%s failed (ignored)", name)

    async def _prepare(self) -> bool:
        if self._ret == 0:
            try:
                await self.prepare()
            except Exception as err:
                self._ret, self._error = _describe(err)
            self._update_rc()
        return self._ret == 0

    async def _finalize_single(self) -> None:
        # A sibling may have failed after this job finished: make sure it aborts (QEMU: "late failures").
        self._update_rc()
        if self._ret == 0:
            await self._run_hook("commit", self.commit)
        else:
            await self._run_hook("abort", self.abort)
        await self._run_hook("clean", self.clean)
        if self._started:
            data: dict[str, Any] = {
                "type": self.type,
                "device": self.id,
                "len": self.progress_total,
                "offset": self.progress_current,
                "speed": self.speed,
            }
            if self._cancelled:
                self._emit(BLOCK_JOB_CANCELLED, data)
            else:
                if self._ret:
                    data["error"] = self._error
                self._emit(BLOCK_JOB_COMPLETED, data)
        self.txn._remove(self)
        self._transition(JobStatus.CONCLUDED)
        if self.auto_dismiss or not self._started:
            self._do_dismiss()

    # ------------------------------------------------------------------ QMP views

    def block_job_info(self) -> dict[str, Any]:
        """This job as query-block-jobs' ``BlockJobInfo``."""
        info: dict[str, Any] = {
            "type": self.type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self._busy,
            "paused": self._pause_count > 0,
            "speed": self.speed,
            "io-status": self._io_status.value,
            "ready": False,
            "status": self._status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self._ret:
            info["error"] = self._error
        return info

    def job_info(self) -> dict[str, Any]:
        """This job as query-jobs' ``JobInfo``."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "status": self._status.value,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self._ret:
            info["error"] = self._error
        return info

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self._status.value}>"


# ---------------------------------------------------------------------- transactions and the registry


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
