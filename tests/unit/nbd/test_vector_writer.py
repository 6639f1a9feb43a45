"""The VectorWriter over a real socket pair: order, partial writes, file segments, flow control, errors;
and the stream output TLS connections use instead."""

from __future__ import annotations

import array
import asyncio
import random
import socket
import tempfile

import pytest

from cowbackup.nbd.connection import StreamOutput
from cowbackup.nbd.replies import FileSegment, Message
from cowbackup.nbd.vector_writer import HELD_HIGH_WATER, HIGH_WATER, VectorWriter


async def _read_all(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    # Small buffers, so large messages are sent in several partial writes.
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    return ours, peer


def test_every_kind_of_piece_arrives_in_order() -> None:
    rng = random.Random(3)
    with tempfile.TemporaryFile() as f:
        file_data = rng.randbytes(300_000)
        f.write(file_data)
        f.flush()

        async def body() -> None:
            ours, peer = _pair()
            writer = VectorWriter(asyncio.get_running_loop(), ours.fileno())
            messages: list[Message] = []
            for i in range(200):
                words = array.array("L", rng.randbytes(8 * rng.randrange(0, 50)))
                pieces: Message = [
                    rng.randbytes(rng.randrange(0, 40)),
                    memoryview(bytearray(rng.randbytes(rng.randrange(0, 5000)))),
                    memoryview(words),  # not byte format: counted and sent as bytes
                ]
                if i % 7 == 0:
                    offset = rng.randrange(0, len(file_data) - 70_000)
                    pieces.append(FileSegment(f.fileno(), offset, 70_000))
                messages.append(pieces)
            expected = bytearray()
            for pieces in messages:
                for piece in pieces:
                    if isinstance(piece, FileSegment):
                        expected += file_data[piece.offset : piece.offset + piece.length]
                    else:
                        expected += bytes(piece)
            reader = asyncio.ensure_future(_read_all(peer, len(expected)))
            for i, pieces in enumerate(messages):
                writer.hold(i % 3 == 0)  # some batches held, some sent as they come
                writer.send(pieces)
                writer.hold(False)
                if i % 10 == 0:
                    await asyncio.sleep(0)
            await asyncio.wait_for(writer.flush(), 10)
            assert writer.queued == 0
            assert await asyncio.wait_for(reader, 10) == bytes(expected)
            writer.abort()
            ours.close()
            peer.close()

        asyncio.run(body())


def test_drain_waits_while_congested_and_flush_until_sent() -> None:
    async def body() -> None:
        ours, peer = _pair()
        writer = VectorWriter(asyncio.get_running_loop(), ours.fileno())
        writer.send([bytes(4 * HIGH_WATER)])
        assert writer.congested()
        drain = asyncio.ensure_future(writer.drain())
        flush = asyncio.ensure_future(writer.flush())
        await asyncio.sleep(0.05)
        assert not drain.done() and not flush.done()  # nobody reads: it stays queued
        data = await asyncio.wait_for(_read_all(peer, 4 * HIGH_WATER), 10)
        assert len(data) == 4 * HIGH_WATER
        await asyncio.wait_for(asyncio.gather(drain, flush), 10)
        assert not writer.congested()
        await asyncio.wait_for(writer.flush(), 1)  # nothing queued: returns at once
        writer.abort()
        ours.close()
        peer.close()

    asyncio.run(body())


def test_a_peer_that_went_away_fails_the_writer_and_wakes_waiters() -> None:
    async def body() -> None:
        ours, peer = _pair()
        writer = VectorWriter(asyncio.get_running_loop(), ours.fileno())
        writer.send([bytes(4 * HIGH_WATER)])
        flush = asyncio.ensure_future(writer.flush())
        await asyncio.sleep(0.01)
        peer.close()
        await asyncio.wait_for(flush, 10)
        assert isinstance(writer.error, OSError)
        assert writer.queued == 0
        writer.send([b"dropped"])  # after an error, sends are dropped quietly
        assert writer.queued == 0
        writer.abort()
        writer.abort()  # idempotent
        ours.close()

    asyncio.run(body())


def test_a_file_ending_early_fails_the_writer() -> None:
    async def body() -> None:
        ours, peer = _pair()
        with tempfile.TemporaryFile() as f:
            f.write(b"x" * 100)
            f.flush()
            writer = VectorWriter(asyncio.get_running_loop(), ours.fileno())
            writer.send([b"head", FileSegment(f.fileno(), 50, 200)])
            await asyncio.wait_for(_read_all(peer, 54), 10)
            await asyncio.wait_for(writer.flush(), 10)
        assert writer.error is not None and "file ended" in str(writer.error)
        writer.abort()
        ours.close()
        peer.close()

    asyncio.run(body())


@pytest.mark.parametrize("pieces", [[b""], [memoryview(b"")], [FileSegment(0, 0, 0)], []])
def test_empty_messages_queue_nothing(pieces: Message) -> None:
    async def body() -> None:
        ours, peer = _pair()
        writer = VectorWriter(asyncio.get_running_loop(), ours.fileno())
        writer.send(pieces)
        assert writer.queued == 0 and not writer.congested()
        await asyncio.wait_for(writer.flush(), 1)
        writer.abort()
        ours.close()
        peer.close()

    asyncio.run(body())


def test_held_replies_congest_only_past_the_held_high_water() -> None:
    """Sixteen 4 KiB read replies held together are just over HIGH_WATER: that is no congestion (the
    release sends them at once), but more than HELD_HIGH_WATER is, held or not."""

    async def body() -> None:
        ours, peer = _pair()
        writer = VectorWriter(asyncio.get_running_loop(), ours.fileno())
        writer.hold(True)
        for _ in range(16):
            writer.send([bytes(16), bytes(4096)])
        assert writer.queued > HIGH_WATER and not writer.congested()
        writer.send([bytes(HELD_HIGH_WATER)])
        assert writer.congested()
        writer.hold(False)
        total = 16 * (16 + 4096) + HELD_HIGH_WATER
        data = await asyncio.wait_for(_read_all(peer, total), 10)
        assert len(data) == total
        await asyncio.wait_for(writer.flush(), 10)
        assert not writer.congested()
        writer.abort()
        ours.close()
        peer.close()

    asyncio.run(body())


def test_send_buffers_mixed_with_send_keeps_order() -> None:
    """Batches given to send_buffers (written at once when idle, the rest queued) and ordinary sends,
    on a socket that takes only part of them: everything arrives, in order."""
    rng = random.Random(11)

    async def body() -> None:
        ours, peer = _pair()
        writer = VectorWriter(asyncio.get_running_loop(), ours.fileno())
        expected = bytearray()
        for i in range(100):
            pieces: list[bytes | memoryview] = [
                rng.randbytes(16),
                memoryview(bytearray(rng.randbytes(rng.randrange(0, 20_000)))),
            ]
            expected += b"".join(pieces)
            if i % 3:
                writer.send_buffers(pieces, sum(len(p) for p in pieces))
            else:
                writer.send(list(pieces))
            if i % 10 == 0:
                expected_now = len(expected)
                got = await _read_all(peer, expected_now - len(received))
                received.extend(got)
        received.extend(await _read_all(peer, len(expected) - len(received)))
        assert bytes(received) == bytes(expected)
        await writer.flush()
        writer.abort()
        ours.close()
        peer.close()

    received = bytearray()
    asyncio.run(body())


def test_stream_output_is_congested_only_while_drain_would_wait() -> None:
    """Under TLS replies go through the stream's transport: the connection takes the fast path while
    the transport is below its high-water mark, and waits (drain) only past it -- a client that does not
    read still stops being served."""

    async def main() -> None:
        ours, peer = _pair()
        _, writer = await asyncio.open_connection(sock=ours)
        out = StreamOutput(writer)
        out.send([b"x" * 100])
        assert not out.congested()
        high = writer.transport.get_write_buffer_limits()[1]
        big = high + 256 * 1024
        out.send([b"y" * big])  # nobody reads: most of it stays in the transport
        assert out.congested()
        received = await _read_all(peer, 100 + big)
        assert len(received) == 100 + big
        await asyncio.wait_for(out.drain(), 5)
        assert not out.congested()
        writer.close()
        peer.close()

    asyncio.run(main())
