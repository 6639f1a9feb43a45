"""A job's pause requests and pause points, and how its parked task is woken (QEMU's job.c: job_pause,
job_resume, job_enter_cond, job_do_yield, job_pause_point, job_sleep_ns, job_yield).

``JobPausePoints`` is a mixin of ``Job`` (job.py): the job's task parks in ``_do_yield()`` -- sleeping,
yielding or paused -- and is woken by ``enter()``, a timer, a new speed or a withdrawn pause. Pause requests
(user and internal) are a count; they take effect only when the task reaches a pause point.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable

from cowbackup.jobs.states import JobStatus

__all__ = ["JobPausePoints"]


class JobPausePoints(abc.ABC):
    """Pause requests, pause points and wake-ups of a ``Job``; see the module docstring.

    All methods must be called on the loop that owns the job.
    """

    # Job's fields, set in Job.__init__, where each says who changes it.
    id: str
    _status: JobStatus
    _pause_count: int
    _paused: bool
    _busy: bool
    _started: bool
    _deferred: bool
    _cancelled: bool
    _wakeup: asyncio.Future[None] | None
    _timer: asyncio.TimerHandle | None

    @abc.abstractmethod
    def _transition(self, new: JobStatus) -> None:
        """Move to status ``new`` (Job's, which also sends the status change)."""

    async def on_pause(self) -> None:  # noqa: B027 - optional hook
        """The job is about to pause at a pause point."""

    async def on_resume(self) -> None:  # noqa: B027 - optional hook
        """The job leaves a pause point that had a pause request."""

    def pause_internal(self) -> None:
        """Add a pause request that the user cannot withdraw (drains); pair with ``resume_internal()``."""
        self._pause_count += 1
        if not self._paused:
            # Wake a sleeping job so that it reaches its pause point now, not when the sleep ends.
            self._enter_cond(None)

    def resume_internal(self) -> None:
        """Withdraw one pause request; the job runs again when none remain."""
        if self._pause_count <= 0:
            raise AssertionError(f"job '{self.id}': resume without pause")
        self._pause_count -= 1
        if self._pause_count == 0:
            # Wake a paused job, but let a job that never reached its pause point finish its sleep.
            self._enter_cond(lambda: self._timer is None)

    def _should_pause(self) -> bool:
        return self._pause_count > 0

    def enter(self) -> None:
        """Wake the job if it is parked in ``sleep()``, ``yield_()`` or a pause (QEMU's job_enter).

        A job woken from a pause re-checks the pause requests and stays paused while any remain.
        """
        self._enter_cond(None)

    def _enter_cond(self, cond: Callable[[], bool] | None) -> None:
        if not self._started or self._deferred or self._busy or self._wakeup is None:
            return
        if cond is not None and not cond():
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # busy is set by the waker, so a second wake-up before the task runs is a no-op (as QEMU's).
        self._busy = True
        if not self._wakeup.done():
            self._wakeup.set_result(None)

    def _timer_fired(self) -> None:
        self._timer = None
        self._enter_cond(None)

    async def _do_yield(self, ns: int | None) -> None:
        loop = asyncio.get_running_loop()
        self._wakeup = loop.create_future()
        if ns is not None:
            self._timer = loop.call_later(max(ns, 0) / 1e9, self._timer_fired)
        self._busy = False
        try:
            await self._wakeup
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._wakeup = None
            self._busy = True

    async def pause_point(self) -> None:
        """Pause here if a pause is requested and the job is not cancelled (QEMU's job_pause_point).

        Calls ``on_pause()``, reports ``paused`` (``standby`` from ``ready``), waits until every pause
        request is withdrawn or the job is cancelled, reports the previous status again, calls
        ``on_resume()``.
        """
        if not self._should_pause() or self._cancelled:
            return
        await self.on_pause()
        if self._should_pause() and not self._cancelled:
            status = self._status
            self._transition(JobStatus.STANDBY if status == JobStatus.READY else JobStatus.PAUSED)
            self._paused = True
            # A loop rather than QEMU's single yield: an unrelated enter() (e.g. a copy finishing) must
            # not un-pause the job while a pause is still requested.
            while self._should_pause() and not self._cancelled:
                await self._do_yield(None)
            self._paused = False
            self._transition(status)
        await self.on_resume()

    async def sleep(self, ns: int) -> None:
        """Sleep ``ns`` nanoseconds, then pass a pause point (QEMU's job_sleep_ns).

        Returns early when the job is cancelled, paused (after the pause ends), ``enter()``-ed, or given a
        higher (or unlimited) speed. Returns at once if the job is cancelled.
        """
        if self._cancelled:
            return
        if not self._should_pause():
            await self._do_yield(ns)
        await self.pause_point()

    async def yield_(self) -> None:
        """Park until ``enter()``, cancel or a pause, then pass a pause point (QEMU's job_yield)."""
        if self._cancelled:
            return
        if not self._should_pause():
            await self._do_yield(None)
        await self.pause_point()
