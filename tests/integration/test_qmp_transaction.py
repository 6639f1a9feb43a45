"""The QMP ``transaction`` command, driven with the ``qemu.qmp`` client against an in-process server.

Nodes: ``src0``/``src1`` null-co (data everywhere, so every byte is copied and rate-limited), ``tgt0``/
``tgt1`` memory, all 4 MiB. ``speed`` plus a 64 KiB ``x-perf.max-chunk`` holds a job in ``running``
(one chunk, then a wait of far more than the test lasts) until it is cancelled. Our server queues a
command's events before its reply, so "no event" is checked with ``events.empty()`` after a reply.
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
TIMEOUT = 20
MiB = 1024 * 1024
NODES = ["tgt1", "tgt0", "src1", "src0"]  # query-named-block-nodes order: newest first
HOLD = {"speed": 1, "x-perf": {"max-chunk": 64 * 1024}}

Ev = tuple[str, dict[str, Any]]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


@asynccontextmanager
async def session(path: Path) -> AsyncIterator[tuple[QMPClient, Daemon]]:
    daemon = Daemon()
    server = QMPServer(daemon)
    await server.listen_unix(str(path))
    client = QMPClient("txn")
    try:
        await client.connect(str(path))
        for n in (0, 1):
            await client.execute(
                "blockdev-add", {"driver": "null-co", "node-name": f"src{n}", "size": 4 * MiB}
            )
        for n in (0, 1):
            await client.execute(
                "blockdev-add", {"driver": "memory", "node-name": f"tgt{n}", "size": 4 * MiB}
            )
        yield client, daemon
    finally:
        await client.disconnect()
        await server.close()
        await daemon.close()


def backup(n: int, **extra: Any) -> dict[str, Any]:
    data = {"job-id": f"j{n}", "device": f"src{n}", "target": f"tgt{n}", "sync": "full", **extra}
    return {"type": "blockdev-backup", "data": data}


ABORT: dict[str, Any] = {"type": "abort", "data": {}}


async def events_until(client: QMPClient, done: dict[str, str]) -> list[Ev]:
    """Events until every job in ``done`` has reached its status there (JOB_STATUS_CHANGE)."""
    out: list[Ev] = []
    waiting = dict(done)
    while waiting:
        event: Any = await client.events.get()
        data = dict(event.get("data", {}))
        out.append((event["event"], data))
        if event["event"] == "JOB_STATUS_CHANGE" and waiting.get(data["id"]) == data["status"]:
            del waiting[data["id"]]
    return out


def job_events(events: list[Ev], job: str) -> list[Ev]:
    """One job's events; JOB_STATUS_CHANGE as ("status", name)."""
    out: list[Ev] = []
    for name, data in events:
        if data.get("id", data.get("device")) != job:
            continue
        out.append(("status", {"status": data["status"]}) if name == "JOB_STATUS_CHANGE" else (name, data))
    return out


def st(*names: str) -> list[Ev]:
    return [("status", {"status": name}) for name in names]


def done(job: str, speed: int = 0, **extra: Any) -> Ev:
    return (
        "BLOCK_JOB_COMPLETED",
        {"type": "backup", "device": job, "len": 4 * MiB, "offset": 4 * MiB, "speed": speed, **extra},
    )


async def refused(client: QMPClient, args: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as err:
        await client.execute("transaction", args)
    return err.value.error.error.class_, err.value.error.error.desc


async def node_names(client: QMPClient) -> list[str]:
    nodes: Any = await client.execute("query-named-block-nodes")
    return [node["node-name"] for node in nodes]


@pytest.mark.parametrize("mode", ["individual", "grouped"])
def test_two_backups_succeed(tmp_path: Path, mode: str) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client, _):
            args = {"actions": [backup(0), backup(1)], "properties": {"completion-mode": mode}}
            assert await client.execute("transaction", args) == {}
            events = await events_until(client, {"j0": "null", "j1": "null"})
            for job in ("j0", "j1"):
                assert job_events(events, job) == [
                    *st("created", "running", "waiting", "pending"),
                    done(job),
                    *st("concluded", "null"),
                ]
            assert await client.execute("query-jobs") == []
            assert await node_names(client) == NODES

    run(main())


def test_individual_jobs_live_apart(tmp_path: Path) -> None:
    """Both filters are in place when the reply comes; cancelling one job leaves the other running."""

    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client, _):
            actions = [backup(0, **HOLD, **{"filter-node-name": "f0"}), backup(1, **HOLD)]
            assert await client.execute("transaction", {"actions": actions}) == {}
            events = await events_until(client, {"j0": "running", "j1": "running"})
            assert [data["status"] for _, data in events[:2]] == ["created", "created"]
            names = await node_names(client)
            assert "f0" in names and len(names) == len(NODES) + 2
            jobs: Any = await client.execute("query-jobs")
            assert sorted((j["id"], j["status"]) for j in jobs) == [("j0", "running"), ("j1", "running")]
            await client.execute("job-cancel", {"id": "j0"})
            events = await events_until(client, {"j0": "null"})
            assert [name for name, _ in job_events(events, "j0")] == [
                "status",
                "BLOCK_JOB_CANCELLED",
                "status",
                "status",
            ]
            assert job_events(events, "j1") == []
            jobs = await client.execute("query-jobs")
            assert [(info["id"], info["status"]) for info in jobs] == [("j1", "running")]
            await client.execute("job-cancel", {"id": "j1"})
            await events_until(client, {"j1": "null"})
            assert await node_names(client) == NODES

    run(main())


def test_grouped_manual_finalize_finalizes_all(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client, _):
            manual = {"auto-finalize": False}
            args = {
                "actions": [backup(0, **manual), backup(1, **manual)],
                "properties": {"completion-mode": "grouped"},
            }
            await client.execute("transaction", args)
            events = await events_until(client, {"j0": "pending", "j1": "pending"})
            # The first job to finish waits in "waiting" for the other; then both become pending, each
            # followed by its BLOCK_JOB_PENDING (the last one may still be on its way).
            for job in ("j0", "j1"):
                statuses = [data for name, data in job_events(events, job) if name == "status"]
                assert statuses[-3:] == [{"status": s} for s in ("running", "waiting", "pending")]
            pending = [data for name, data in events if name == "BLOCK_JOB_PENDING"]
            while len(pending) < 2:
                event: Any = await client.events.get()
                assert event["event"] == "BLOCK_JOB_PENDING"
                pending.append(event["data"])
            assert sorted(p["id"] for p in pending) == ["j0", "j1"]
            await client.execute("job-finalize", {"id": "j1"})
            events = await events_until(client, {"j0": "null", "j1": "null"})
            for job in ("j0", "j1"):
                assert job_events(events, job) == [done(job), *st("concluded", "null")]

    run(main())


def test_grouped_failure_cancels_sibling(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client, _):
            await client.execute(
                "blockdev-add",
                {
                    "driver": "fault-inject",
                    "node-name": "bad",
                    "file": "src1",
                    "rules": [{"op": "read", "nth": 1, "errno": "EIO"}],
                },
            )
            failing = {"type": "blockdev-backup", "data": {**backup(1)["data"], "device": "bad"}}
            args = {"actions": [backup(0, **HOLD), failing], "properties": {"completion-mode": "grouped"}}
            assert await client.execute("transaction", args) == {}
            events = await events_until(client, {"j0": "null", "j1": "null"})
            assert job_events(events, "j1") == [
                *st("created", "running"),
                ("BLOCK_JOB_ERROR", {"device": "j1", "operation": "read", "action": "report"}),
                *st("aborting"),
                ("BLOCK_JOB_COMPLETED", done("j1", error="Input/output error", offset=0)[1]),
                *st("concluded", "null"),
            ]
            j0 = job_events(events, "j0")
            assert [name for name, _ in j0] == ["status"] * 3 + ["BLOCK_JOB_CANCELLED"] + ["status"] * 2
            assert [data["status"] for name, data in j0 if name == "status"] == [
                "created",
                "running",
                "aborting",
                "concluded",
                "null",
            ]
            cancelled = j0[3][1]
            assert (cancelled["device"], cancelled["speed"], cancelled["len"]) == ("j0", 1, 4 * MiB)
            assert await client.execute("query-jobs") == []
            assert await node_names(client) == ["bad", *NODES]

    run(main())


def test_grouped_cancel_cancels_sibling(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client, _):
            args = {
                "actions": [backup(0, **HOLD), backup(1, **HOLD)],
                "properties": {"completion-mode": "grouped"},
            }
            await client.execute("transaction", args)
            await events_until(client, {"j0": "running", "j1": "running"})
            await client.execute("block-job-cancel", {"device": "j1"})
            events = await events_until(client, {"j0": "null", "j1": "null"})
            for job in ("j0", "j1"):
                names = [data.get("status", name) for name, data in job_events(events, job)]
                assert names == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
            assert await node_names(client) == NODES

    run(main())


@pytest.mark.parametrize("mode", ["individual", "grouped"])
def test_failed_action_rolls_back_prepared_backups(tmp_path: Path, mode: str) -> None:
    """Newest first, each prepared job is cancelled before it started: aborting, concluded, null and no
    BLOCK_JOB_CANCELLED (QEMU's events); the filters are gone. (qemu-storage-daemon 7.2 hangs in the
    grouped case with two prepared jobs; QEMU's job_finish_sync waits for a job that never started.)"""

    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client, _):
            last = ABORT if mode == "individual" else backup(2)  # no src2: "Cannot find ..."
            args: dict[str, Any] = {
                "actions": [backup(0, **{"filter-node-name": "f0"}), backup(1), last],
                "properties": {"completion-mode": mode},
            }
            desc = (
                "Transaction aborted using Abort action"
                if mode == "individual"
                else "Cannot find device='src2' nor node-name='src2'"
            )
            assert await refused(client, args) == ("GenericError", desc)
            events = await events_until(client, {"j0": "null", "j1": "null"})
            assert [(d["id"], d["status"]) for _, d in events] == [
                ("j0", "created"),
                ("j1", "created"),
                ("j1", "aborting"),
                ("j1", "concluded"),
                ("j1", "null"),
                ("j0", "aborting"),
                ("j0", "concluded"),
                ("j0", "null"),
            ]
            assert client.events.empty()
            assert await client.execute("query-jobs") == []
            assert await node_names(client) == NODES
            # Nothing is left holding the names: the same transaction without the failure runs.
            args["actions"] = args["actions"][:2]
            assert await client.execute("transaction", args) == {}
            await events_until(client, {"j0": "null", "j1": "null"})

    run(main())


def test_abort_alone_and_empty(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client, _):
            assert await refused(client, {"actions": [ABORT]}) == (
                "GenericError",
                "Transaction aborted using Abort action",
            )
            assert await client.execute("transaction", {"actions": []}) == {}
            assert client.events.empty()

    run(main())


BAD_ARGS: list[tuple[dict[str, Any], str]] = [
    ({}, "Parameter 'actions' is missing"),
    ({"actions": {}}, "Invalid parameter type for 'actions', expected: array"),
    ({"actions": [1]}, "Invalid parameter type for 'actions[0]', expected: object"),
    ({"actions": [{"data": {}}]}, "Parameter 'actions[0].type' is missing"),
    (
        {"actions": [{"type": 1, "data": {}}]},
        "Invalid parameter type for 'actions[0].type', expected: string",
    ),
    # QEMU names an enum by its bare member name, at any depth.
    ({"actions": [{"type": "foo", "data": {}}]}, "Parameter 'type' does not accept value 'foo'"),
    # Actions QEMU has that we do not (snapshots, drive-backup): unknown to our schema.
    (
        {"actions": [{"type": "blockdev-snapshot", "data": {"node": "src0", "overlay": "b"}}]},
        "Parameter 'type' does not accept value 'blockdev-snapshot'",
    ),
    ({"actions": [{"type": "abort"}]}, "Parameter 'actions[0].data' is missing"),
    ({"actions": [{"type": "abort", "data": {"x": 1}}]}, "Parameter 'actions[0].data.x' is unexpected"),
    ({"actions": [{"type": "abort", "data": {}, "x": 1}]}, "Parameter 'actions[0].x' is unexpected"),
    # A malformed later action: nothing is prepared (no job, no event).
    ({"actions": [backup(0), {"type": "blockdev-backup"}]}, "Parameter 'actions[1].data' is missing"),
    (
        {"actions": [backup(0), {"type": "blockdev-backup", "data": {"device": "src1", "target": "tgt1"}}]},
        "Parameter 'actions[1].data.sync' is missing",
    ),
    ({"actions": [backup(0), backup(1, sync="bad")]}, "Parameter 'sync' does not accept value 'bad'"),
    (
        {"actions": [backup(0), backup(1, speed="x")]},
        "Invalid parameter type for 'actions[1].data.speed', expected: integer",
    ),
    (
        {"actions": [backup(0), backup(1, **{"x-perf": {"max-chunk": "x"}})]},
        "Invalid parameter type for 'actions[1].data.x-perf.max-chunk', expected: integer",
    ),
    ({"actions": [backup(0), backup(1, bogus=1)]}, "Parameter 'actions[1].data.bogus' is unexpected"),
    ({"actions": [], "properties": 1}, "Invalid parameter type for 'properties', expected: object"),
    (
        {"actions": [], "properties": {"completion-mode": "x"}},
        "Parameter 'completion-mode' does not accept value 'x'",
    ),
    ({"actions": [], "properties": {"foo": 1}}, "Parameter 'properties.foo' is unexpected"),
    ({"actions": [], "foo": 1}, "Parameter 'foo' is unexpected"),
    (
        {"actions": [backup(0), ABORT], "properties": {"completion-mode": "grouped"}},
        "Action 'abort' does not support transaction property completion-mode = grouped",
    ),
]


def test_argument_errors_create_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client, _):
            for args, desc in BAD_ARGS:
                assert await refused(client, args) == ("GenericError", desc), args
            assert client.events.empty()
            assert await client.execute("query-jobs") == []
            assert await node_names(client) == NODES

    run(main())


def test_semantic_errors_after_rollback(tmp_path: Path) -> None:
    """Errors of the job layer come back as they are, after the earlier actions were rolled back."""

    async def main() -> None:
        async with session(tmp_path / "q.sock") as (client, _):
            cases = [
                (backup(1, speed=-1), "Parameter 'speed' expects a non-negative value"),
                (backup(1, **{"job-id": "j0"}), "Job ID 'j0' already in use"),
                (backup(1, **{"job-id": "1x"}), "Invalid job ID '1x'"),
                (backup(1, target="src1"), "Source and target cannot be the same"),
                (
                    backup(1, **{"x-perf": {"max-chunk": 4096}}),
                    "Required max-chunk (4096) is less than backup cluster size (65536)",
                ),
            ]
            for action, desc in cases:
                assert await refused(client, {"actions": [backup(0), action]}) == ("GenericError", desc)
                events = await events_until(client, {"j0": "null"})
                statuses = [d["status"] for _, d in events if d["id"] == "j0"]
                assert statuses == ["created", "aborting", "concluded", "null"]
                assert client.events.empty()
            assert await node_names(client) == NODES

    run(main())
