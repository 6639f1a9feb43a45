"""Backup jobs driven over QMP with the ``qemu.qmp`` client: arguments, verbs, and the exact events.

The server runs in the test's event loop on an in-process Daemon; nodes are ``null-co`` and ``memory``,
``fault-inject`` (scripted failures), and a speed limit keeps a job running long enough to pause or
cancel it. BLOCK_JOB_PENDING follows JOB_STATUS_CHANGE(pending), as in QEMU.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecuteError, QMPClient

from cowbackup.daemon import Daemon
from cowbackup.qmp.server import QMPServer

T = TypeVar("T")
TIMEOUT = 30
MiB = 1024 * 1024


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


@asynccontextmanager
async def session(path: Path, clients: int = 1) -> AsyncIterator[list[QMPClient]]:
    """A daemon with a ``src`` null-co and a ``tgt`` memory node (4 MiB), and ``clients`` monitors."""
    daemon = Daemon()
    server = QMPServer(daemon)
    await server.listen_unix(str(path))
    connected: list[QMPClient] = []
    try:
        for n in range(clients):
            client = QMPClient(f"c{n}")
            await client.connect(str(path))
            connected.append(client)
        # null-co without read-zeroes reports data everywhere, so every byte is copied (and rate-limited).
        await connected[0].execute("blockdev-add", {"driver": "null-co", "node-name": "src", "size": 4 * MiB})
        await connected[0].execute("blockdev-add", {"driver": "memory", "node-name": "tgt", "size": 4 * MiB})
        yield connected
    finally:
        for client in connected:
            await client.disconnect()
        await server.close()
        await daemon.close()


async def events_until(client: QMPClient, job: str, status: str) -> list[tuple[str, dict[str, Any]]]:
    """Events (name, data) up to and including JOB_STATUS_CHANGE(job, status); checks timestamps."""
    out: list[tuple[str, dict[str, Any]]] = []
    while True:
        event: Any = await client.events.get()
        ts = event["timestamp"]
        assert isinstance(ts["seconds"], int) and ts["seconds"] > 1_600_000_000
        assert 0 <= ts["microseconds"] < 1_000_000
        data = dict(event.get("data", {}))
        out.append((event["event"], data))
        if event["event"] == "JOB_STATUS_CHANGE" and data == {"id": job, "status": status}:
            return out


async def query(client: QMPClient, cmd: str) -> Any:
    return await client.execute(cmd)


def statuses(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The JOB_STATUS_CHANGE statuses, without transient paused/running pairs (drains)."""
    out: list[str] = []
    for name, data in events:
        if name != "JOB_STATUS_CHANGE":
            continue
        if data["status"] == "running" and out and out[-1] == "paused":
            out.pop()
            continue
        out.append(data["status"])
    return out


def others(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, data) for name, data in events if name != "JOB_STATUS_CHANGE"]


async def refused(client: QMPClient, cmd: str, args: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as err:
        await client.execute(cmd, args)
    return err.value.error.error.class_, err.value.error.error.desc


def completed(job: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    data = {"type": "backup", "device": job, "len": 4 * MiB, "offset": 4 * MiB, "speed": 0}
    data.update(extra)
    return ("BLOCK_JOB_COMPLETED", data)


def test_backup_success_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client,):
            args = {"job-id": "j0", "device": "src", "target": "tgt", "sync": "full"}
            assert await client.execute("blockdev-backup", args) == {}
            events = await events_until(client, "j0", "null")
            assert statuses(events) == ["created", "running", "waiting", "pending", "concluded", "null"]
            assert others(events) == [completed("j0")]
            assert await client.execute("query-jobs") == []

    run(main())


def test_backup_argument_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client,):
            base = {"device": "src", "target": "tgt", "sync": "full"}
            assert await refused(client, "blockdev-backup", {**base, "sync": "x"}) == (
                "GenericError",
                "Parameter 'sync' does not accept value 'x'",
            )
            assert await refused(client, "blockdev-backup", {**base, "device": "nope"}) == (
                "GenericError",
                "Cannot find device='nope' nor node-name='nope'",
            )
            assert await refused(client, "blockdev-backup", {"device": "src", "target": "tgt"}) == (
                "GenericError",
                "Parameter 'sync' is missing",
            )
            assert await refused(client, "blockdev-backup", {**base, "speed": "1"}) == (
                "GenericError",
                "Invalid parameter type for 'speed', expected: integer",
            )
            bad_perf = {**base, "x-perf": {"max-workers": "a"}}
            assert await refused(client, "blockdev-backup", bad_perf) == (
                "GenericError",
                "Invalid parameter type for 'x-perf.max-workers', expected: integer",
            )
            assert await refused(client, "blockdev-backup", {**base, "x-perf": {"foo": 1}}) == (
                "GenericError",
                "Parameter 'x-perf.foo' is unexpected",
            )
            assert await refused(client, "block-job-cancel", {"device": "j"}) == (
                "DeviceNotActive",
                "Block job 'j' not found",
            )
            assert await refused(client, "job-cancel", {"id": "j"}) == ("GenericError", "Job not found")
            assert await refused(client, "block-job-set-speed", {"device": "j"}) == (
                "GenericError",
                "Parameter 'speed' is missing",
            )

    run(main())


def test_manual_finalize_and_dismiss(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client,):
            args = {
                "job-id": "j0",
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "auto-finalize": False,
                "auto-dismiss": False,
                "x-perf": {"max-workers": 2, "use-copy-range": False},
            }
            await client.execute("blockdev-backup", args)
            events = await events_until(client, "j0", "pending")
            assert statuses(events) == ["created", "running", "waiting", "pending"]
            assert others(events) == []
            pending: Any = await client.events.get()
            assert (pending["event"], pending["data"]) == (
                "BLOCK_JOB_PENDING",
                {"type": "backup", "id": "j0"},
            )
            (info,) = await query(client, "query-block-jobs")
            assert info["status"] == "pending" and info["device"] == "j0"
            assert info["auto-finalize"] is False and info["auto-dismiss"] is False
            (jinfo,) = await query(client, "query-jobs")
            assert jinfo["id"] == "j0" and jinfo["status"] == "pending"
            assert await refused(client, "job-dismiss", {"id": "j0"}) == (
                "GenericError",
                "Job 'j0' in state 'pending' cannot accept command verb 'dismiss'",
            )
            assert await refused(client, "block-job-complete", {"device": "j0"}) == (
                "GenericError",
                "Job 'j0' in state 'pending' cannot accept command verb 'complete'",
            )
            await client.execute("job-finalize", {"id": "j0"})
            events = await events_until(client, "j0", "concluded")
            assert statuses(events) == ["concluded"]
            assert others(events) == [completed("j0")]
            assert await refused(client, "job-finalize", {"id": "j0"}) == (
                "GenericError",
                "Job 'j0' in state 'concluded' cannot accept command verb 'finalize'",
            )
            await client.execute("block-job-dismiss", {"id": "j0"})
            assert statuses(await events_until(client, "j0", "null")) == ["null"]
            assert await client.execute("query-block-jobs") == []

    run(main())


def test_failure_reports_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client,):
            await client.execute(
                "blockdev-add",
                {
                    "driver": "fault-inject",
                    "node-name": "bad",
                    "file": "src",
                    "rules": [{"op": "read", "nth": 1, "errno": "EIO"}],
                },
            )
            await client.execute(
                "blockdev-backup", {"job-id": "j1", "device": "bad", "target": "tgt", "sync": "full"}
            )
            events = await events_until(client, "j1", "null")
            assert statuses(events) == ["created", "running", "aborting", "concluded", "null"]
            names = [name for name, _ in others(events)]
            assert names == ["BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED"]
            error, done = others(events)
            assert error[1] == {"device": "j1", "operation": "read", "action": "report"}
            assert done[1]["error"] == "Input/output error"
            assert done[1]["device"] == "j1"

    run(main())


def test_pause_resume_cancel_running(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client,):
            args = {
                "job-id": "j2",
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "speed": 64 * 1024,
                "x-perf": {"max-chunk": 64 * 1024},  # small copy calls, so the limit bites at once
            }
            await client.execute("blockdev-backup", args)
            await events_until(client, "j2", "running")
            await client.execute("job-pause", {"id": "j2"})
            await events_until(client, "j2", "paused")
            assert await refused(client, "block-job-pause", {"device": "j2"}) == (
                "GenericError",
                "Job is already paused",
            )
            await client.execute("block-job-resume", {"device": "j2"})
            await events_until(client, "j2", "running")
            assert await refused(client, "job-resume", {"id": "j2"}) == (
                "GenericError",
                "Can't resume a job that was not paused",
            )
            await client.execute("block-job-set-speed", {"device": "j2", "speed": 32 * 1024})
            (info,) = await query(client, "query-block-jobs")
            assert info["speed"] == 32 * 1024 and info["status"] == "running"
            # The abort flow runs before the reply: every event is already queued.
            await client.execute("block-job-cancel", {"device": "j2"})
            events = await events_until(client, "j2", "null")
            assert statuses(events) == ["aborting", "concluded", "null"]
            ((name, data),) = others(events)
            assert name == "BLOCK_JOB_CANCELLED"
            assert data["device"] == "j2" and data["type"] == "backup" and data["speed"] == 32 * 1024

    run(main())


def test_cancel_while_pending(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client,):
            args = {"job-id": "j3", "device": "src", "target": "tgt", "sync": "full", "auto-finalize": False}
            await client.execute("blockdev-backup", args)
            await events_until(client, "j3", "pending")
            pending: Any = await client.events.get()
            assert pending["event"] == "BLOCK_JOB_PENDING"
            await client.execute("job-cancel", {"id": "j3"})
            events = await events_until(client, "j3", "null")
            assert statuses(events) == ["aborting", "concluded", "null"]
            assert [name for name, _ in others(events)] == ["BLOCK_JOB_CANCELLED"]

    run(main())


def test_events_reach_every_monitor(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock", clients=2) as (first, second):
            await first.execute(
                "blockdev-backup", {"job-id": "j4", "device": "src", "target": "tgt", "sync": "full"}
            )
            seen = [await events_until(c, "j4", "null") for c in (first, second)]
            assert seen[0] == seen[1]
            assert statuses(seen[1]) == ["created", "running", "waiting", "pending", "concluded", "null"]

    run(main())
