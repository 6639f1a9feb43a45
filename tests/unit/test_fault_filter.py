"""The ``fault-inject`` filter: scripted errors and stalls, counted deterministically."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.memory import MemoryNode
from cowbackup.block.errors import BlockError, RequestError
from cowbackup.block.filters.fault import FaultNode, Rule, fault_append
from cowbackup.block.graph import BlockGraph, Root

SIZE = 1 << 20


def run(func: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(func())


async def make(graph: BlockGraph | None = None) -> tuple[FaultNode, MemoryNode]:
    graph = graph or BlockGraph()
    mem = await open_node(graph, {"driver": "memory", "node-name": "mem", "size": SIZE})
    assert isinstance(mem, MemoryNode)
    return fault_append(graph, mem, "fault"), mem


async def errno_of(call: Coroutine[Any, Any, Any]) -> int:
    """errno of the request's failure, 0 when it succeeds."""
    try:
        await call
    except RequestError as err:
        return err.errno or -1
    return 0


def test_nth_and_count() -> None:
    async def main() -> None:
        node, mem = await make()
        assert node.size == SIZE
        rule = node.inject("write", nth=2, count=2, errno=errno.ENOSPC)
        results = [await errno_of(node.write(i * 4096, b"x" * 10)) for i in range(5)]
        assert results == [0, errno.ENOSPC, errno.ENOSPC, 0, 0]
        assert (rule.seen, rule.hits, rule.exhausted) == (5, 2, True)
        assert mem.data[4096] == 0  # failed writes never reached the child
        assert mem.data[3 * 4096] == ord("x")
        assert await errno_of(node.read(0, bytearray(10))) == 0  # reads do not match

    run(main)


def test_count_zero_means_forever_and_any_write() -> None:
    async def main() -> None:
        node, _ = await make()
        node.inject("any-write", nth=3, count=0)
        calls = [
            node.write(0, b"a"),
            node.write_zeroes(0, 10),
            node.discard(0, 4096),
            node.write(0, b"b"),
            node.write_zeroes(0, 10),
            node.read(0, bytearray(1)),
            node.flush(),
        ]
        results = [await errno_of(call) for call in calls]
        assert results == [0, 0, errno.EIO, errno.EIO, errno.EIO, 0, 0]

    run(main)


def test_offset_range_and_other_ops() -> None:
    async def main() -> None:
        node, _ = await make()
        node.inject("read", count=0, offset_range=(8192, 12288), errno=errno.EBADMSG)
        flush = node.inject("flush")
        status = node.inject("block_status", nth=2)
        assert await errno_of(node.read(0, bytearray(8192))) == 0
        assert await errno_of(node.read(4096, bytearray(4097))) == errno.EBADMSG  # overlaps by one byte
        assert await errno_of(node.read(12288, bytearray(10))) == 0
        assert await errno_of(node.flush()) == errno.EIO
        assert await errno_of(node.flush()) == 0
        assert flush.hits == 1
        assert await errno_of(node.block_status(0, 10)) == 0
        assert await errno_of(node.block_status(0, 10)) == errno.EIO
        assert status.exhausted

    run(main)


def test_error_message_names_the_injection() -> None:
    async def main() -> None:
        node, _ = await make()
        node.inject("discard", errno=errno.EROFS)
        with pytest.raises(RequestError) as info:
            await node.discard(4096, 4096)
        assert info.value.errno == errno.EROFS
        assert "injected into discard at offset 4096 by 'fault'" in str(info.value)

    run(main)


def test_stall_release_and_drain() -> None:
    async def main() -> None:
        node, mem = await make()
        rule = node.inject("write", stall=True)
        writer = asyncio.create_task(node.write(0, b"late"))
        await rule.wait_hits(1)
        assert rule.waiting == 1
        assert node.in_flight == 1
        drained = asyncio.create_task(node.drain())
        other = asyncio.create_task(node.read(0, bytearray(4)))  # not matched: passes at once
        await other
        for _ in range(5):
            await asyncio.sleep(0)
        assert not writer.done()
        assert not drained.done()
        assert mem.data[:4] == bytes(4)
        rule.release()
        await writer
        await drained
        assert mem.data[:4] == b"late"
        assert (rule.waiting, rule.hits, node.in_flight) == (0, 1, 0)
        assert await errno_of(node.write(0, b"next")) == 0  # count=1: done

    run(main)


def test_release_all_and_clear() -> None:
    async def main() -> None:
        node, _ = await make()
        rules = [node.inject("flush", stall=True), node.inject("block_status", stall=True)]
        failing = node.inject("flush", errno=errno.EDQUOT)
        flush = asyncio.create_task(node.flush())
        status = asyncio.create_task(node.block_status(0, 4096))
        for rule in rules:
            await rule.wait_hits()
        assert node.in_flight == 2  # flush and block status count for drain too
        node.release_all()
        with pytest.raises(RequestError) as info:
            await flush  # stalled first, then the error rule fired on the same request
        assert info.value.errno == errno.EDQUOT
        assert failing.hits == 1
        assert (await status).length == 4096
        node.inject("read")
        node.clear()
        assert node.rules == []
        assert await errno_of(node.read(0, bytearray(1))) == 0

    run(main)


def test_python_api_validation() -> None:
    async def main() -> None:
        node, _ = await make()
        with pytest.raises(ValueError, match="unknown operation 'writ'"):
            node.inject("writ")
        with pytest.raises(ValueError, match="bad rule"):
            node.inject("read", nth=0)
        assert isinstance(node.inject("read", errno=errno.ENOSPC), Rule)

    run(main)


def test_append_and_drop_repoint_users() -> None:
    async def main() -> None:
        graph = BlockGraph()
        mem = await open_node(graph, {"driver": "memory", "node-name": "mem", "size": SIZE})
        user = Root("export 'disk'")
        graph.attach(user, "root", mem)
        node = fault_append(graph, mem)
        assert user.node is node
        node.inject("read")
        assert await errno_of(user.node.read(0, bytearray(1))) == errno.EIO
        graph.drop_filter(node)
        assert user.node is mem
        assert node.node_name not in graph.nodes

    run(main)


def test_blockdev_add_rules() -> None:
    async def main() -> None:
        graph = BlockGraph()
        node = await open_node(
            graph,
            {
                "driver": "fault-inject",
                "node-name": "f",
                "file": {"driver": "memory", "size": SIZE},
                "rules": [
                    {"op": "read", "nth": 2, "errno": "ENOSPC"},
                    {"op": "write", "errno": 28, "count": "2", "offset": 4096, "length": 4096},
                ],
            },
        )
        assert isinstance(node, FaultNode)
        assert node.child.implicit
        assert [await errno_of(node.read(0, bytearray(1))) for _ in range(3)] == [0, errno.ENOSPC, 0]
        assert await errno_of(node.write(0, b"x")) == 0
        assert await errno_of(node.write(8191, b"xy")) == errno.ENOSPC
        assert node.rules[1].offset_range == (4096, 8192)
        # The command line's dotted form gives a dict with numeric keys.
        dotted = await open_node(
            graph,
            {
                "driver": "fault-inject",
                "node-name": "g",
                "file": "f",
                "rules": {"0": {"op": "flush", "stall": "on"}},
            },
        )
        assert isinstance(dotted, FaultNode)
        assert dotted.rules[0].stall
        await graph.remove("g")
        await graph.remove("f")
        assert graph.nodes == {}

    run(main)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"op": "writ"}], "Parameter 'rules.0.op' does not accept value 'writ'"),
        ([{}], "Parameter 'rules.0.op' is missing"),
        ([{"op": "read", "errno": "EBOGUS"}], "Parameter 'rules.0.errno' does not accept value 'EBOGUS'"),
        ([{"op": "read", "errno": -5}], "Parameter 'rules.0.errno' does not accept value '-5'"),
        ([{"op": "read"}, {"op": "read", "nth": 0}], "Parameter 'rules.1.nth' expects a value of at least 1"),
        ([{"op": "read", "when": "now"}], "Parameter 'rules.0.when' is unexpected"),
        ("read", "Invalid parameter type for 'rules', expected: array"),
        (["read"], "Invalid parameter type for 'rules.0', expected: object"),
    ],
)
def test_blockdev_add_bad_rules(rules: Any, message: str) -> None:
    async def main() -> None:
        graph = BlockGraph()
        with pytest.raises(BlockError) as info:
            await open_node(
                graph,
                {"driver": "fault-inject", "node-name": "f", "file": {"driver": "null-co"}, "rules": rules},
            )
        assert str(info.value) == message
        assert graph.nodes == {}

    run(main)
