"""The job layer against QEMU's contract: tables, event sequences, verbs, pause/cancel, error policy, txns."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from cowbackup.jobs import (
    BLOCK_JOB_CANCELLED,
    BLOCK_JOB_COMPLETED,
    BLOCK_JOB_ERROR,
    BLOCK_JOB_PENDING,
    JOB_STATUS_CHANGE,
    BlockdevOnError,
    DeviceNotActiveError,
    ErrorAction,
    Event,
    EventBus,
    Job,
    JobError,
    JobManager,
    JobStatus,
    JobTxn,
    JobVerb,
)

T = TypeVar("T")
CHUNK = 65536
TIMEOUT = 10.0


@contextlib.contextmanager
def raises_msg(cls: type[Exception], message: str) -> Iterator[None]:
    """Expect ``cls`` with exactly ``message`` (QEMU's messages are the contract)."""
    with pytest.raises(cls) as info:
        yield
    assert str(info.value) == message


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine on a fresh loop, bounded so that a bug hangs nothing."""
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


class Recorder:
    """Records every event of a bus and lets a test wait for one, without polling."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []
        bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        self.events.append(event)
        for match, fut in list(self._waiters):
            if not fut.done() and match(event):
                fut.set_result(event)

    async def wait_for(self, name: str, since: int = 0, **fields: Any) -> Event:
        """The first event named ``name`` whose data has ``fields``, among the events from index
        ``since`` on, past or future."""

        def match(event: Event) -> bool:
            return event.name == name and all(event.data.get(k) == v for k, v in fields.items())

        for event in self.events[since:]:
            if match(event):
                return event
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, fut))
        return await fut

    async def wait_status(self, job_id: str, status: str) -> None:
        await self.wait_for(JOB_STATUS_CHANGE, id=job_id, status=status)

    def statuses(self, job_id: str) -> list[str]:
        return [
            e.data["status"] for e in self.events if e.name == JOB_STATUS_CHANGE and e.data["id"] == job_id
        ]

    def trace(self, job_id: str) -> list[str]:
        """The job's events in order: statuses by value, other events by name."""
        out = []
        for e in self.events:
            if e.data.get("id", e.data.get("device")) != job_id:
                continue
            out.append(e.data["status"] if e.name == JOB_STATUS_CHANGE else e.name)
        return out

    def named(self, name: str, job_id: str) -> list[dict[str, Any]]:
        return [
            e.data for e in self.events if e.name == name and e.data.get("device", e.data.get("id")) == job_id
        ]


class StepJob(Job):
    """Copies ``steps`` chunks, sleeping between them; can fail at one step; records its hooks."""

    def __init__(
        self,
        job_id: str,
        manager: JobManager,
        *,
        steps: int = 3,
        delay_ns: int = 1_000_000,
        fail_at: int | None = None,
        fail_prepare: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(job_id, "backup", manager, **kwargs)
        self.steps = steps
        self.delay_ns = delay_ns
        self.fail_at = fail_at
        self.fail_prepare = fail_prepare
        self.calls: list[str] = []
        self.parked = asyncio.Event()

    async def run(self) -> None:
        self.calls.append("run")
        self.progress_set_remaining(self.steps * CHUNK)
        for i in range(self.steps):
            if self.is_cancelled():
                raise asyncio.CancelledError
            if i == self.fail_at:
                raise eio()
            self.progress_update(CHUNK)
            self.progress_set_remaining((self.steps - i - 1) * CHUNK)
            self.parked.set()
            await self.sleep(self.delay_ns)

    async def prepare(self) -> None:
        self.calls.append("prepare")
        if self.fail_prepare:
            raise eio()

    async def commit(self) -> None:
        self.calls.append("commit")

    async def abort(self) -> None:
        self.calls.append("abort")

    async def clean(self) -> None:
        self.calls.append("clean")

    async def on_pause(self) -> None:
        self.calls.append("on_pause")

    async def on_resume(self) -> None:
        self.calls.append("on_resume")

    def on_set_speed(self, speed: int) -> None:
        self.calls.append(f"speed={speed}")

    def on_cancel(self, force: bool) -> None:
        self.calls.append("on_cancel")


class GateJob(StepJob):
    """Does one chunk, then parks until the test opens the gate (or cancels); QEMU-style cancel check."""

    def __init__(self, job_id: str, manager: JobManager, *, fail: bool = False, **kwargs: Any) -> None:
        super().__init__(job_id, manager, **kwargs)
        self.fail = fail
        self.open = False

    async def run(self) -> None:
        self.calls.append("run")
        self.progress_set_remaining(2 * CHUNK)
        self.progress_update(CHUNK)
        self.progress_set_remaining(CHUNK)
        while not self.open and not self.is_cancelled():
            self.parked.set()
            await self.yield_()
        if self.is_cancelled():
            return
        if self.fail:
            raise eio()
        self.progress_update(CHUNK)
        self.progress_set_remaining(0)

    def release(self) -> None:
        self.open = True
        self.enter()


def setup() -> tuple[JobManager, Recorder]:
    manager = JobManager()
    return manager, Recorder(manager.events)


# ---------------------------------------------------------------------- tables

# qemu-backup-today.md section 2.4, written out independently of the implementation.
_LETTERS = {
    "C": "created",
    "R": "running",
    "P": "paused",
    "Y": "ready",
    "S": "standby",
    "W": "waiting",
    "D": "pending",
    "X": "aborting",
    "E": "concluded",
    "N": "null",
}
ALLOWED_TRANSITIONS = {
    "undefined": "C",
    "created": "RXN",
    "running": "PYWX",
    "paused": "R",
    "ready": "SWX",
    "standby": "Y",
    "waiting": "DX",
    "pending": "XE",
    "aborting": "XE",
    "concluded": "N",
    "null": "",
}
ALLOWED_VERBS = {
    "cancel": "CRPYSWD",
    "pause": "CRPYS",
    "resume": "CRPYS",
    "set-speed": "CRPYS",
    "change": "CRPYS",
    "complete": "YS",
    "finalize": "D",
    "dismiss": "E",
}


def test_enum_values() -> None:
    assert [s.value for s in JobStatus] == [
        "undefined", "created", "running", "paused", "ready", "standby",
        "waiting", "pending", "aborting", "concluded", "null",
    ]  # fmt: skip
    assert [v.value for v in JobVerb] == [
        "cancel", "pause", "resume", "set-speed", "change", "complete", "finalize", "dismiss",
    ]  # fmt: skip


@pytest.mark.parametrize("status", list(JobStatus))
@pytest.mark.parametrize("verb", list(JobVerb))
def test_verb_table(status: JobStatus, verb: JobVerb) -> None:
    job = StepJob("job0", JobManager())
    job._status = status
    allowed = {_LETTERS[c] for c in ALLOWED_VERBS[verb.value]}
    if status.value in allowed:
        job.apply_verb(verb)
    else:
        with pytest.raises(JobError) as info:
            job.apply_verb(verb)
        assert (
            str(info.value)
            == f"Job 'job0' in state '{status.value}' cannot accept command verb '{verb.value}'"
        )
        assert info.value.qmp_class == "GenericError"


@pytest.mark.parametrize("old", list(JobStatus))
@pytest.mark.parametrize("new", list(JobStatus))
def test_transition_table(old: JobStatus, new: JobStatus) -> None:
    job = StepJob("job0", JobManager())
    job._status = old
    if new.value in {_LETTERS[c] for c in ALLOWED_TRANSITIONS[old.value]}:
        job._transition(new)
        assert job.status == new
    else:
        with pytest.raises(AssertionError, match="illegal status transition"):
            job._transition(new)


@pytest.mark.parametrize("bad", ["", "1job", "job 0", "job/0", "_job", "jöb"])
def test_invalid_job_id(bad: str) -> None:
    manager = JobManager()
    with raises_msg(JobError, f"Invalid job ID '{bad}'"):
        StepJob(bad, manager)
    assert manager.list() == []


def test_job_id_in_use_including_concluded() -> None:
    async def main() -> None:
        manager, _ = setup()
        job = StepJob("a.b-c_1", manager, steps=1, auto_dismiss=False)
        with raises_msg(JobError, "Job ID 'a.b-c_1' already in use"):
            StepJob("a.b-c_1", manager)
        job.start()
        await job.wait_concluded()
        assert job.status == JobStatus.CONCLUDED
        with pytest.raises(JobError, match="already in use"):
            StepJob("a.b-c_1", manager)
        job.dismiss()
        StepJob("a.b-c_1", manager)  # the id is free again

    run(main())


def test_negative_speed_at_creation() -> None:
    manager, rec = setup()
    with raises_msg(JobError, "Parameter 'speed' expects a non-negative value"):
        StepJob("job0", manager, speed=-1)
    assert manager.list() == []
    # As QEMU: created, then dropped at once.
    assert [(e.name, e.data) for e in rec.events] == [
        ("JOB_STATUS_CHANGE", {"id": "job0", "status": "created"}),
        ("JOB_STATUS_CHANGE", {"id": "job0", "status": "null"}),
    ]


def test_lookup() -> None:
    manager = JobManager()
    a = StepJob("a", manager)
    b = StepJob("b", manager)
    assert manager.get("a") is a
    assert manager.get("zz") is None
    assert manager.find_job("b") is b
    assert manager.find_block_job("b") is b
    assert manager.list() == [b, a]  # newest first, as QEMU's job list
    with raises_msg(JobError, "Job not found"):
        manager.find_job("zz")
    with raises_msg(DeviceNotActiveError, "Block job 'zz' not found"):
        manager.find_block_job("zz")
    assert JobError.qmp_class == "GenericError"
    assert DeviceNotActiveError.qmp_class == "DeviceNotActive"


# ---------------------------------------------------------------------- event sequences


def test_success() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager, steps=3)
        assert job.status == JobStatus.CREATED
        job.start()
        await manager.wait(job)
        assert rec.trace("job0") == [
            "created", "running", "waiting", "pending", BLOCK_JOB_COMPLETED, "concluded", "null",
        ]  # fmt: skip
        assert rec.named(BLOCK_JOB_COMPLETED, "job0") == [
            {"type": "backup", "device": "job0", "len": 3 * CHUNK, "offset": 3 * CHUNK, "speed": 0}
        ]
        assert job.calls == ["run", "prepare", "commit", "clean"]
        assert manager.get("job0") is None
        assert job.error is None

    run(main())


def test_manual_finalize() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager, steps=2, auto_finalize=False)
        job.start()
        await rec.wait_for(BLOCK_JOB_PENDING, id="job0")
        assert job.status == JobStatus.PENDING
        assert rec.named(BLOCK_JOB_PENDING, "job0") == [{"type": "backup", "id": "job0"}]
        assert job.calls == ["run"]
        with pytest.raises(JobError, match="cannot accept command verb 'dismiss'"):
            job.dismiss()
        await job.finalize()
        assert rec.trace("job0") == [
            "created", "running", "waiting", "pending", BLOCK_JOB_PENDING,
            BLOCK_JOB_COMPLETED, "concluded", "null",
        ]  # fmt: skip
        assert job.calls == ["run", "prepare", "commit", "clean"]

    run(main())


def test_manual_dismiss() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager, steps=1, auto_dismiss=False)
        job.start()
        await job.wait_concluded()
        assert job.status == JobStatus.CONCLUDED
        assert manager.list() == [job]
        assert job.job_info() == {
            "id": "job0", "type": "backup", "status": "concluded",
            "current-progress": CHUNK, "total-progress": CHUNK,
        }  # fmt: skip
        job.dismiss()
        assert rec.statuses("job0")[-2:] == ["concluded", "null"]
        assert manager.list() == []

    run(main())


def test_failure() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager, steps=3, fail_at=1, auto_dismiss=False)
        job.start()
        await job.wait_concluded()
        assert rec.trace("job0") == ["created", "running", "aborting", BLOCK_JOB_COMPLETED, "concluded"]
        assert rec.named(BLOCK_JOB_COMPLETED, "job0") == [
            {
                "type": "backup",
                "device": "job0",
                "len": 3 * CHUNK,
                "offset": CHUNK,
                "speed": 0,
                "error": "Input/output error",
            }
        ]
        assert job.calls == ["run", "abort", "clean"]
        assert job.job_info()["error"] == "Input/output error"
        assert job.block_job_info()["error"] == "Input/output error"
        job.dismiss()
        assert rec.statuses("job0")[-1] == "null"

    run(main())


def test_unexpected_exception_fails_job(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Job):
        async def run(self) -> None:
            raise ValueError("bug")

    async def main() -> None:
        manager, rec = setup()
        job = Broken("job0", "backup", manager)
        job.start()
        await job.wait_concluded()
        assert rec.named(BLOCK_JOB_COMPLETED, "job0")[0]["error"] == "bug"

    with caplog.at_level(logging.ERROR):
        run(main())
    assert "unexpected exception" in caplog.text


@pytest.mark.parametrize("job_class", [StepJob, GateJob])
def test_cancel_running(job_class: type[StepJob]) -> None:
    """StepJob's run() raises CancelledError, GateJob's returns: both end cancelled."""

    async def main() -> None:
        manager, rec = setup()
        job = job_class("job0", manager, steps=1000, delay_ns=10**9)
        job.start()
        await job.parked.wait()
        assert not job.busy
        assert job.cancel() is None
        await job.wait_concluded()
        assert rec.trace("job0") == [
            "created",
            "running",
            "aborting",
            BLOCK_JOB_CANCELLED,
            "concluded",
            "null",
        ]
        data = rec.named(BLOCK_JOB_CANCELLED, "job0")[0]
        assert data["offset"] == CHUNK
        assert "error" not in data
        assert job.calls == ["run", "on_cancel", "abort", "clean"]

    run(main())


def test_cancel_paused() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager, steps=1000, delay_ns=10**9)
        job.start()
        await job.parked.wait()
        job.pause()
        await rec.wait_status("job0", "paused")
        job.cancel()
        await job.wait_concluded()
        assert rec.trace("job0") == [
            "created", "running", "paused", "running", "aborting", BLOCK_JOB_CANCELLED, "concluded", "null",
        ]  # fmt: skip
        assert job.calls == ["run", "on_pause", "on_cancel", "on_resume", "abort", "clean"]

    run(main())


def test_cancel_pending() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager, steps=2, auto_finalize=False)
        job.start()
        await rec.wait_for(BLOCK_JOB_PENDING, id="job0")
        task = job.cancel()
        assert task is not None
        await task
        assert job.status == JobStatus.NULL
        assert rec.trace("job0") == [
            "created", "running", "waiting", "pending", BLOCK_JOB_PENDING,
            "aborting", BLOCK_JOB_CANCELLED, "concluded", "null",
        ]  # fmt: skip
        data = rec.named(BLOCK_JOB_CANCELLED, "job0")[0]
        assert data["offset"] == data["len"] == 2 * CHUNK
        assert job.calls == ["run", "on_cancel", "abort", "clean"]

    run(main())


def test_cancel_before_start() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager)
        task = job.cancel()
        assert task is not None
        await task
        # Never started: no BLOCK_JOB_CANCELLED, and dismissed whatever auto-dismiss says (as QEMU).
        assert rec.trace("job0") == ["created", "aborting", "concluded", "null"]
        assert job.calls == ["on_cancel", "abort", "clean"]
        assert manager.list() == []

    run(main())


def test_early_fail() -> None:
    manager, rec = setup()
    job = StepJob("job0", manager)
    job.early_fail()
    assert rec.trace("job0") == ["created", "null"]
    assert manager.list() == []


# ---------------------------------------------------------------------- pause, resume, speed


def test_pause_holds_progress() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager, steps=40, delay_ns=1_000_000)
        job.start()
        await job.parked.wait()
        job.pause()
        with raises_msg(JobError, "Job is already paused"):
            job.pause()
        await rec.wait_status("job0", "paused")
        info = job.block_job_info()
        assert info["paused"] is True
        assert info["busy"] is False
        assert info["status"] == "paused"
        offset = job.progress_current
        await asyncio.sleep(0.05)
        assert job.progress_current == offset
        job.resume()
        with raises_msg(JobError, "Can't resume a job that was not paused"):
            job.resume()
        await job.wait_concluded()
        assert job.progress_current == 40 * CHUNK
        assert rec.statuses("job0") == [
            "created", "running", "paused", "running", "waiting", "pending", "concluded", "null",
        ]  # fmt: skip

    run(main())


def test_resume_running_job_errors() -> None:
    async def main() -> None:
        manager, _ = setup()
        job = GateJob("job0", manager)
        job.start()
        await job.parked.wait()
        with raises_msg(JobError, "Can't resume a job that was not paused"):
            job.resume()
        job.release()
        await job.wait_concluded()

    run(main())


def test_pause_before_start() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager, steps=1)
        assert job.block_job_info()["paused"] is True  # created jobs count as paused, as QEMU's
        job.pause()
        job.start()
        await rec.wait_status("job0", "paused")
        assert job.calls == ["on_pause"]  # run() not entered yet
        job.resume()
        await job.wait_concluded()
        assert rec.statuses("job0")[:4] == ["created", "running", "paused", "running"]

    run(main())


def test_internal_pause_needs_all_resumes() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = StepJob("job0", manager, steps=1000, delay_ns=10**9)
        job.start()
        await job.parked.wait()
        job.pause_internal()
        job.pause()
        await rec.wait_status("job0", "paused")
        job.resume()  # the drain still holds it
        await asyncio.sleep(0.01)
        assert job.status == JobStatus.PAUSED
        assert job.paused
        mark = len(rec.events)
        job.resume_internal()
        await rec.wait_for(JOB_STATUS_CHANGE, since=mark, id="job0", status="running")
        assert rec.statuses("job0")[-2:] == ["paused", "running"]
        job.cancel()
        await job.wait_concluded()

    run(main())


def test_set_speed_kicks_sleeping_job() -> None:
    async def main() -> None:
        manager, _ = setup()
        job = StepJob("job0", manager, steps=1, delay_ns=3600 * 10**9, speed=1000)
        job.start()
        await job.parked.wait()
        job.set_speed(2000)
        await job.wait_concluded()
        assert job.calls[:2] == ["run", "speed=2000"]

    run(main())


@pytest.mark.parametrize("new_speed", [1000, 500])
def test_set_speed_lower_does_not_kick(new_speed: int) -> None:
    async def main() -> None:
        manager, _ = setup()
        job = StepJob("job0", manager, steps=1, delay_ns=3600 * 10**9, speed=1000)
        job.start()
        await job.parked.wait()
        job.set_speed(new_speed)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not job.busy
        assert job.status == JobStatus.RUNNING
        assert job.block_job_info()["speed"] == new_speed
        job.cancel()
        await job.wait_concluded()

    run(main())


def test_set_speed_unlimited_kicks() -> None:
    async def main() -> None:
        manager, _ = setup()
        job = StepJob("job0", manager, steps=1, delay_ns=3600 * 10**9, speed=1000)
        job.start()
        await job.parked.wait()
        job.set_speed(0)
        await job.wait_concluded()

    run(main())


def test_set_speed_negative() -> None:
    job = StepJob("job0", JobManager(), speed=5)
    with raises_msg(JobError, "Parameter 'speed' expects a non-negative value"):
        job.set_speed(-1)
    assert job.speed == 5
    assert job.calls == []


def test_complete_refused() -> None:
    job = StepJob("job0", JobManager())
    with raises_msg(JobError, "Job 'job0' in state 'created' cannot accept command verb 'complete'"):
        job.complete()
    job._status = JobStatus.READY
    with raises_msg(JobError, "The active block job 'job0' cannot be completed"):
        job.complete()


def test_block_job_info() -> None:
    job = StepJob("job0", JobManager(), speed=7, auto_finalize=False)
    assert job.block_job_info() == {
        "type": "backup",
        "device": "job0",
        "len": 0,
        "offset": 0,
        "busy": False,
        "paused": True,
        "speed": 7,
        "io-status": "ok",
        "ready": False,
        "status": "created",
        "auto-finalize": False,
        "auto-dismiss": True,
    }


def test_progress() -> None:
    job = StepJob("job0", JobManager())
    job.progress_set_remaining(100)
    job.progress_update(30)
    assert (job.progress_current, job.progress_total) == (30, 100)
    job.progress_set_remaining(20)  # total may shrink
    assert job.progress_total == 50
    job.progress_increase_remaining(10)
    assert job.progress_total == 60


# ---------------------------------------------------------------------- error policy


class ErrorJob(StepJob):
    """Fails one read with ``err`` under ``policy`` and acts on the answer as backup does."""

    def __init__(self, job_id: str, manager: JobManager, policy: BlockdevOnError, err: OSError) -> None:
        super().__init__(job_id, manager)
        self.policy = policy
        self.err = err
        self.actions: list[ErrorAction] = []

    async def run(self) -> None:
        self.progress_set_remaining(CHUNK)
        action = self.error_action(self.policy, True, self.err)
        self.actions.append(action)
        if action == ErrorAction.REPORT:
            raise self.err
        if action == ErrorAction.STOP:
            await self.pause_point()
        self.progress_update(CHUNK)


def test_error_stop_and_resume() -> None:
    async def main() -> None:
        manager, rec = setup()
        err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        job = ErrorJob("job0", manager, BlockdevOnError.ENOSPC, err)
        job.start()
        await rec.wait_status("job0", "paused")
        assert rec.named(BLOCK_JOB_ERROR, "job0") == [
            {"device": "job0", "operation": "read", "action": "stop"}
        ]
        assert job.io_status == "nospace"
        assert job.user_paused
        info = job.block_job_info()
        assert (info["io-status"], info["paused"]) == ("nospace", True)
        job.resume()
        assert job.io_status == "ok"
        await job.wait_concluded()
        assert rec.named(BLOCK_JOB_COMPLETED, "job0")[0]["offset"] == CHUNK
        assert "error" not in rec.named(BLOCK_JOB_COMPLETED, "job0")[0]

    run(main())


def test_error_stop_then_cancel_clears_io_status() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = ErrorJob("job0", manager, BlockdevOnError.STOP, eio())
        job.start()
        await rec.wait_status("job0", "paused")
        assert job.io_status == "failed"
        job.cancel()
        assert job.io_status == "ok"
        await job.wait_concluded()
        assert rec.named(BLOCK_JOB_CANCELLED, "job0")

    run(main())


@pytest.mark.parametrize(
    ("policy", "err_no", "action"),
    [
        (BlockdevOnError.REPORT, errno.EIO, ErrorAction.REPORT),
        (BlockdevOnError.REPORT, errno.ENOSPC, ErrorAction.REPORT),
        (BlockdevOnError.IGNORE, errno.EIO, ErrorAction.IGNORE),
        (BlockdevOnError.ENOSPC, errno.EIO, ErrorAction.REPORT),
        (BlockdevOnError.AUTO, errno.EIO, ErrorAction.REPORT),
        (BlockdevOnError.AUTO, errno.ENOSPC, ErrorAction.STOP),
        (BlockdevOnError.STOP, errno.EIO, ErrorAction.STOP),
    ],
)
def test_error_action_policy(policy: BlockdevOnError, err_no: int, action: ErrorAction) -> None:
    manager, rec = setup()
    job = StepJob("job0", manager)
    assert job.error_action(policy, False, OSError(err_no, os.strerror(err_no))) == action
    assert rec.named(BLOCK_JOB_ERROR, "job0") == [{"device": "job0", "operation": "write", "action": action}]
    assert job.user_paused == (action == ErrorAction.STOP)
    expected_io = "ok" if action != ErrorAction.STOP else ("nospace" if err_no == errno.ENOSPC else "failed")
    assert job.io_status == expected_io


def test_error_report_fails_job_with_error_before_completed() -> None:
    async def main() -> None:
        manager, rec = setup()
        job = ErrorJob("job0", manager, BlockdevOnError.REPORT, eio())
        job.start()
        await job.wait_concluded()
        assert rec.trace("job0") == [
            "created", "running", BLOCK_JOB_ERROR, "aborting", BLOCK_JOB_COMPLETED, "concluded", "null",
        ]  # fmt: skip
        assert rec.named(BLOCK_JOB_COMPLETED, "job0")[0]["error"] == "Input/output error"

    run(main())


# ---------------------------------------------------------------------- transactions (grouped)


def test_txn_success_waits_for_all() -> None:
    async def main() -> None:
        manager, rec = setup()
        txn = JobTxn()
        a = StepJob("a", manager, steps=1, txn=txn)
        b = GateJob("b", manager, txn=txn)
        a.start()
        b.start()
        await rec.wait_status("a", "waiting")
        await b.parked.wait()
        assert a.status == JobStatus.WAITING
        assert a.calls == ["run"]
        b.release()
        await a.wait_concluded()
        await b.wait_concluded()
        for job_id in "ab":
            assert rec.statuses(job_id) == ["created", "running", "waiting", "pending", "concluded", "null"]
        # The last job to finish moves everybody to pending at once.
        order = [(e.data["id"], e.data["status"]) for e in rec.events if e.name == JOB_STATUS_CHANGE]
        assert order.index(("b", "waiting")) < order.index(("a", "pending"))
        assert a.calls == ["run", "prepare", "commit", "clean"]
        assert b.calls == ["run", "prepare", "commit", "clean"]

    run(main())


def test_txn_failure_cancels_waiting_sibling() -> None:
    async def main() -> None:
        manager, rec = setup()
        txn = JobTxn()
        a = StepJob("a", manager, steps=1, txn=txn)
        b = GateJob("b", manager, fail=True, txn=txn)
        a.start()
        b.start()
        await rec.wait_status("a", "waiting")
        b.release()
        await a.wait_concluded()
        await b.wait_concluded()
        assert rec.trace("a") == [
            "created", "running", "waiting", "aborting", BLOCK_JOB_CANCELLED, "concluded", "null",
        ]  # fmt: skip
        assert rec.trace("b") == [
            "created", "running", "aborting", BLOCK_JOB_COMPLETED, "concluded", "null",
        ]  # fmt: skip
        assert rec.named(BLOCK_JOB_COMPLETED, "b")[0]["error"] == "Input/output error"
        assert a.calls == ["run", "on_cancel", "abort", "clean"]
        assert b.calls == ["run", "abort", "clean"]

    run(main())


def test_txn_failure_cancels_running_sibling() -> None:
    async def main() -> None:
        manager, rec = setup()
        txn = JobTxn()
        a = GateJob("a", manager, txn=txn)
        b = StepJob("b", manager, steps=3, fail_at=1, txn=txn)
        a.start()
        b.start()
        await a.wait_concluded()
        await b.wait_concluded()
        assert rec.trace("a") == ["created", "running", "aborting", BLOCK_JOB_CANCELLED, "concluded", "null"]
        assert rec.named(BLOCK_JOB_COMPLETED, "b")[0]["error"] == "Input/output error"
        assert manager.list() == []

    run(main())


def test_txn_cancel_one_cancels_all() -> None:
    async def main() -> None:
        manager, rec = setup()
        txn = JobTxn()
        a = GateJob("a", manager, txn=txn)
        b = GateJob("b", manager, txn=txn)
        a.start()
        b.start()
        await a.parked.wait()
        await b.parked.wait()
        a.cancel()
        await a.wait_concluded()
        await b.wait_concluded()
        assert rec.named(BLOCK_JOB_CANCELLED, "a")
        assert rec.named(BLOCK_JOB_CANCELLED, "b")

    run(main())


def test_txn_manual_finalize_finalizes_all() -> None:
    async def main() -> None:
        manager, rec = setup()
        txn = JobTxn()
        a = StepJob("a", manager, steps=1, txn=txn)  # auto-finalize on, but b needs finalize
        b = StepJob("b", manager, steps=2, auto_finalize=False, txn=txn)
        a.start()
        b.start()
        await rec.wait_for(BLOCK_JOB_PENDING, id="b")
        assert a.status == b.status == JobStatus.PENDING
        assert not rec.named(BLOCK_JOB_PENDING, "a")
        await b.finalize()
        await a.wait_concluded()
        assert a.calls[-3:] == b.calls[-3:] == ["prepare", "commit", "clean"]
        assert rec.named(BLOCK_JOB_COMPLETED, "a")
        assert rec.named(BLOCK_JOB_COMPLETED, "b")

    run(main())


def test_txn_prepare_failure_aborts_all() -> None:
    async def main() -> None:
        manager, rec = setup()
        txn = JobTxn()
        a = StepJob("a", manager, steps=1, fail_prepare=True, txn=txn)
        b = StepJob("b", manager, steps=1, txn=txn)
        a.start()
        b.start()
        await a.wait_concluded()
        await b.wait_concluded()
        assert rec.named(BLOCK_JOB_COMPLETED, "a")[0]["error"] == "Input/output error"
        assert rec.named(BLOCK_JOB_CANCELLED, "b")
        assert "commit" not in a.calls + b.calls
        assert a.calls[-2:] == b.calls[-2:] == ["abort", "clean"]

    run(main())


# ---------------------------------------------------------------------- shutdown


def test_cancel_all() -> None:
    async def main() -> None:
        manager, rec = setup()
        running = GateJob("running", manager)
        paused = StepJob("paused", manager, steps=1000, delay_ns=10**9)
        pending = StepJob("pending", manager, steps=1, auto_finalize=False)
        concluded = StepJob("concluded", manager, steps=1, auto_dismiss=False)
        created = StepJob("created", manager)
        for job in (running, paused, pending, concluded):
            job.start()
        await running.parked.wait()
        await paused.parked.wait()
        paused.pause()
        await rec.wait_status("paused", "paused")
        await rec.wait_for(BLOCK_JOB_PENDING, id="pending")
        await concluded.wait_concluded()
        await manager.cancel_all()
        assert manager.list() == []
        for job in (running, paused, pending, concluded, created):
            assert job.status == JobStatus.NULL
        assert rec.named(BLOCK_JOB_CANCELLED, "pending")

    run(main())


# ---------------------------------------------------------------------- event bus


def test_event_bus(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    got: list[str] = []

    def bad(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    unsubscribe = bus.subscribe(lambda e: got.append("first " + e.name))
    bus.subscribe(bad)
    bus.subscribe(lambda e: got.append("last " + e.name))
    with caplog.at_level(logging.ERROR):
        bus.emit(Event("X", {}))
    assert got == ["first X", "last X"]
    assert "subscriber bug" in caplog.text
    unsubscribe()
    unsubscribe()
    bus.emit(Event("Y", {}))
    assert got == ["first X", "last X", "last Y"]
