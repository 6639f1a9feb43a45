"""The NBD server under abuse: many connections, garbage, stalled handshakes, clients that vanish.

Most tests run an in-process :class:`~cowbackup.nbd.listener.NBDServer` inside ``asyncio.run`` (so the
handshake timeout can be small and the connection count observed) with real peers (libnbd, qemu-io,
nbdcopy) as subprocesses and hand-written misbehaving clients (:class:`RawClient`) in the same loop.
After each kind of abuse the server must have dropped exactly the bad connections, kept serving the
good ones, logged no unexpected error, and left the served file as it was (no partial write).

Also: flow control (a client that does not read its replies, in transmission or in the handshake, stops
being read from instead of making the server buffer without end), TLS handshakes abused, and
``cowbackup serve`` stopped with SIGINT while a client has requests in flight or does not read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cowbackup.nbd.connection import FINISH_GRACE, MAX_IN_FLIGHT
from cowbackup.nbd.constants import (
    IHAVEOPT,
    NBD_CMD_DISC,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_LIST,
    NBD_OPT_STARTTLS,
    NBD_REP_ACK,
    NBD_REP_MAGIC,
    NBD_REP_SERVER,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
)
from cowbackup.nbd.listener import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS

from .conftest import MiB, assert_same_content, random_file
from .nbd_server_fixtures import (
    EXPORT_INFO,
    OPTION,
    SIMPLE_REPLY,
    ExportSpec,
    InProcess,
    RawClient,
    acheck_tool,
    arun_tool,
    in_process_server,
    make_tls_creds,
    nbdsh_script,
    require_libnbd_python,
    require_tools,
    script_result,
    serve,
    system_python_env,
    wait_until,
)

SIZE = 16 * MiB
HANDSHAKE_TIMEOUT = 0.5
CLIENT_FLAGS = struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)


@pytest.fixture(scope="module", autouse=True)
def _peers() -> None:
    require_tools("qemu-io", "nbdinfo", "nbdcopy")


@pytest.fixture
def image(workdir: Path) -> Path:
    return random_file(workdir / "disk.img", SIZE, seed=11)


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing at ERROR or above: no request failed unexpectedly, no task died unnoticed."""
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def normal_client_reads(srv: InProcess, content: bytes, offset: int = 1000) -> None:
    """qemu-io reads a range over a fresh connection and sees ``content``, the file's bytes."""
    out = await acheck_tool("qemu-io", "-f", "raw", "-c", f"read -v {offset} 70000", srv.uri())
    assert content[offset : offset + 16].hex(" ") in out, out


def run_in_process(
    image: Path,
    workdir: Path,
    scenario: Callable[[InProcess], Awaitable[None]],
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """``asyncio.run`` a scenario against an in-process server exporting ``image`` as ``""``."""

    async def main() -> None:
        async with in_process_server(
            workdir / "nbd.sock",
            [ExportSpec("", image)],
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
        ) as srv:
            await scenario(srv)
            await srv.wait_connections(0)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- many


def test_200_concurrent_connections(image: Path, workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """200 libnbd connections open at once (cap raised to 250), each with a read in flight."""
    require_libnbd_python()
    peak = 0

    async def scenario(srv: InProcess) -> None:
        nonlocal peak
        script = asyncio.ensure_future(
            arun_tool(
                *nbdsh_script("nbdsh_connections.py", srv.uri(), str(image), "200", "0"),
                env=system_python_env(),
            )
        )
        while not script.done():
            peak = max(peak, srv.server.connection_count)
            await asyncio.sleep(0.005)
        result = script_result(await script)
        assert result == {
            "connected": 200,
            "refused": 0,
            "refusal": [],
            "correct_reads": 200,
            "reconnected_after": None,
        }

    run_in_process(image, workdir, scenario, max_connections=250)
    assert peak == 200
    assert_no_errors_logged(caplog)


def test_connection_cap_refuses_extra_connections(
    image: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At the default cap of 100, the 101st..103rd are refused; the 100 keep working; a slot frees."""
    require_libnbd_python()

    async def scenario(srv: InProcess) -> None:
        assert srv.server.max_connections == 100
        result = script_result(
            await arun_tool(
                *nbdsh_script("nbdsh_connections.py", srv.uri(), str(image), "100", "3"),
                env=system_python_env(),
            )
        )
        assert result["connected"] == 100
        assert result["refused"] == 3
        assert result["correct_reads"] == 101  # the 100, and the one accepted after a close
        assert result["reconnected_after"] is not None

    run_in_process(image, workdir, scenario)
    refusals = [r for r in caplog.records if "refusing connection" in r.getMessage()]
    assert len(refusals) >= 3
    assert_no_errors_logged(caplog)


# ---------------------------------------------------------------------------------------------- garbage


async def garbage_before_greeting(srv: InProcess, rng: random.Random) -> None:
    client = await RawClient.connect(srv.socket)
    client.writer.write(rng.randbytes(4096))
    await client.wait_closed_by_server()
    await client.close()


async def garbage_client_flags(srv: InProcess, rng: random.Random) -> None:
    client = await RawClient.connect(srv.socket)
    await client.read_greeting()
    client.writer.write(b"\xff\xff\xff\xff" + rng.randbytes(100))
    await client.wait_closed_by_server()
    await client.close()


async def garbage_option(srv: InProcess, rng: random.Random) -> None:
    client = await RawClient.connect(srv.socket)
    await client.read_greeting()
    client.writer.write(CLIENT_FLAGS + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + rng.randbytes(1000))
    await client.wait_closed_by_server()
    await client.close()


async def huge_option(srv: InProcess, rng: random.Random) -> None:
    """An option announcing 1 GiB of data: beyond the hard limit, the server hangs up at once."""
    client = await RawClient.connect(srv.socket)
    await client.read_greeting()
    client.writer.write(CLIENT_FLAGS + OPTION.pack(IHAVEOPT, NBD_OPT_GO, 1 << 30) + rng.randbytes(64))
    await client.wait_closed_by_server()
    await client.close()


async def garbage_request(srv: InProcess, rng: random.Random) -> None:
    client = await RawClient.connect(srv.socket)
    await client.handshake()
    client.writer.write(rng.randbytes(28 * 10))
    await client.wait_closed_by_server()
    await client.close()


GARBAGE = [garbage_before_greeting, garbage_client_flags, garbage_option, huge_option, garbage_request]


def test_garbage_connections_are_dropped(
    image: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = image.read_bytes()

    async def scenario(srv: InProcess) -> None:
        good = await RawClient.connect(srv.socket)
        await good.handshake()
        rng = random.Random(3)
        await asyncio.gather(*(kind(srv, rng) for kind in GARBAGE for _ in range(4)))
        await srv.wait_connections(1)
        # the client that behaved is still served
        good.request(NBD_CMD_READ, cookie=7, offset=4096, length=512)
        assert await good.reply(512) == (0, 7, before[4096:4608])
        await good.close()
        await normal_client_reads(srv, before)

    run_in_process(image, workdir, scenario)
    assert image.read_bytes() == before
    assert_no_errors_logged(caplog)


def test_garbage_does_not_disturb_nbdcopy(
    image: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """50 garbage connections while nbdcopy copies the export out and a file in: both copies exact."""
    incoming = random_file(workdir / "incoming.img", SIZE, seed=12)
    target = random_file(workdir / "target.img", SIZE, seed=13)
    out = workdir / "out.img"
    out.touch()

    during_copy = 0

    async def scenario(srv: InProcess) -> None:
        nonlocal during_copy
        rng = random.Random(4)
        copies = asyncio.gather(
            acheck_tool("nbdcopy", srv.uri(), str(out)),
            acheck_tool("nbdcopy", str(incoming), srv.uri("target")),
        )
        await wait_until(lambda: srv.server.connection_count > 0 or copies.done(), 10, "nbdcopy")
        # waves of 10 garbage connections, at least 50 in all, and on until both copies are done
        sent = 0
        while sent < 50 or not copies.done():
            running = not copies.done()
            await asyncio.gather(*(GARBAGE[(sent + i) % len(GARBAGE)](srv, rng) for i in range(10)))
            sent += 10
            during_copy += 10 if running else 0
        await copies

    async def main() -> None:
        exports = [ExportSpec("", image), ExportSpec("target", target)]
        async with in_process_server(workdir / "nbd.sock", exports) as srv:
            await scenario(srv)
            await srv.wait_connections(0)

    asyncio.run(main())
    assert during_copy >= 10, "the copies were over before the garbage came"
    assert_same_content(out, image)
    assert_same_content(target, incoming)
    assert_no_errors_logged(caplog)


# ---------------------------------------------------------------------------------------------- stalls


def test_half_handshakes_time_out(image: Path, workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Clients that stop mid-handshake are dropped after the handshake timeout; others are not."""
    caplog.set_level(logging.INFO, logger="cowbackup.nbd")
    data = image.read_bytes()

    async def silent_after_greeting(srv: InProcess) -> float:
        client = await RawClient.connect(srv.socket)
        start = time.monotonic()
        await client.read_greeting()
        await client.wait_closed_by_server()
        await client.close()
        return time.monotonic() - start

    async def silent_from_the_start(srv: InProcess) -> float:
        client = await RawClient.connect(srv.socket)
        start = time.monotonic()
        await client.wait_closed_by_server()  # the greeting arrives, then the close
        await client.close()
        return time.monotonic() - start

    async def half_an_option(srv: InProcess) -> float:
        client = await RawClient.connect(srv.socket)
        start = time.monotonic()
        await client.read_greeting()
        client.writer.write(CLIENT_FLAGS + OPTION.pack(IHAVEOPT, NBD_OPT_GO, 100) + b"\0" * 10)
        await client.wait_closed_by_server()
        await client.close()
        return time.monotonic() - start

    async def scenario(srv: InProcess) -> None:
        # a client in transmission: idle for longer than the handshake timeout, it must stay connected
        idle = await RawClient.connect(srv.socket)
        await idle.handshake()
        stalls = [silent_after_greeting] * 20 + [silent_from_the_start] * 5 + [half_an_option] * 5
        stalled = asyncio.gather(*(stall(srv) for stall in stalls))
        await normal_client_reads(srv, data)  # served while 30 handshakes hang
        waited = await stalled
        assert min(waited) >= HANDSHAKE_TIMEOUT * 0.8, waited
        assert max(waited) < HANDSHAKE_TIMEOUT + 3, waited
        await srv.wait_connections(1)
        idle.request(NBD_CMD_READ, cookie=1, offset=0, length=16)
        assert await idle.reply(16) == (0, 1, data[:16])
        await idle.close()

    run_in_process(image, workdir, scenario, handshake_timeout=HANDSHAKE_TIMEOUT)
    assert sum("handshake not finished" in r.getMessage() for r in caplog.records) == 30
    assert_no_errors_logged(caplog)


# ---------------------------------------------------------------------------------------------- vanishing


def test_clients_vanishing_mid_payload_or_mid_request(
    image: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut-off writes leave no trace; requests whose client left still complete harmlessly."""
    expected = bytearray(image.read_bytes())

    async def half_a_write(srv: InProcess, offset: int) -> None:
        """A WRITE announcing 1 MiB, half of it sent, then gone."""
        client = await RawClient.connect(srv.socket)
        await client.handshake()
        client.request(NBD_CMD_WRITE, cookie=1, offset=offset, length=MiB)
        client.writer.write(b"\xee" * (MiB // 2))
        await client.writer.drain()
        await client.close()

    async def half_a_header(srv: InProcess) -> None:
        client = await RawClient.connect(srv.socket)
        await client.handshake()
        client.writer.write(struct.pack(">IHH", NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE) + b"\0\0")
        await client.writer.drain()
        await client.close()

    async def reads_never_collected(srv: InProcess) -> None:
        """16 reads of 1 MiB and a close before any reply is read."""
        client = await RawClient.connect(srv.socket)
        await client.handshake()
        for i in range(16):
            client.request(NBD_CMD_READ, cookie=i, offset=i * MiB, length=MiB)
        await client.writer.drain()
        await client.close()

    async def whole_write_then_gone(srv: InProcess) -> None:
        """A complete WRITE, and a close without waiting for the reply: the write still lands."""
        client = await RawClient.connect(srv.socket)
        await client.handshake()
        client.request(NBD_CMD_WRITE, cookie=2, offset=12 * MiB + 5, length=100_000)
        client.writer.write(b"\x42" * 100_000)
        await client.writer.drain()
        await client.close()

    async def scenario(srv: InProcess) -> None:
        await asyncio.gather(
            *(half_a_write(srv, i * 2 * MiB) for i in range(4)),
            *(half_a_header(srv) for _ in range(4)),
            *(reads_never_collected(srv) for _ in range(4)),
            whole_write_then_gone(srv),
        )
        await srv.wait_connections(0)
        await normal_client_reads(srv, bytes(expected))

    expected[12 * MiB + 5 : 12 * MiB + 5 + 100_000] = b"\x42" * 100_000
    run_in_process(image, workdir, scenario)
    assert image.read_bytes() == expected
    assert_no_errors_logged(caplog)


# ---------------------------------------------------------------------------------------------- shutdown


def test_sigint_with_requests_in_flight_exits_promptly(workdir: Path) -> None:
    """SIGINT to ``cowbackup serve`` while a client streams writes: exit 0 within seconds; every write
    the server acknowledged is in the file, and no other write left a trace (answers to the requests
    that completed go out before the close, the rest are dropped whole)."""
    image = random_file(workdir / "busy.img", 64 * MiB, seed=21)
    original = image.read_bytes()
    count, length = 64, MiB
    sent: list[int] = []
    acked: dict[int, int] = {}

    with serve(image, workdir) as s:

        async def main() -> tuple[int, float]:
            client = await RawClient.connect(s.socket)
            await client.handshake()

            async def send() -> None:
                for cookie in range(count):
                    client.request(NBD_CMD_WRITE, cookie=cookie, offset=cookie * length, length=length)
                    client.writer.write(bytes([cookie + 1]) * length)
                    sent.append(cookie)
                    await client.writer.drain()

            sender = asyncio.ensure_future(send())
            error, cookie, _ = await client.reply()
            acked[cookie] = error
            await wait_until(lambda: len(sent) >= 4, 10, "more writes sent")
            in_flight = len(sent) - len(acked)  # sent (or sending), not answered
            os.kill(s.pid, signal.SIGINT)
            start = time.monotonic()
            try:
                while True:
                    error, cookie, _ = await client.reply()
                    acked[cookie] = error
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the server closed the connection
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await client.close()
            return in_flight, start

        in_flight, start = asyncio.run(main())
        code = s.cli.finish(timeout=10)
        elapsed = time.monotonic() - start
        assert code == 0, s.cli.stderr()
        assert in_flight > 0  # requests were outstanding when the signal came
        assert elapsed < 5, f"took {elapsed:.1f} s to exit"
    assert not s.socket.exists()
    assert set(acked) <= set(sent)
    assert all(error == 0 for error in acked.values()), acked
    data = image.read_bytes()
    for cookie in range(count):
        region = slice(cookie * length, (cookie + 1) * length)
        if cookie in acked:
            assert data[region] == bytes([cookie + 1]) * length, f"acknowledged write {cookie} is missing"
        else:
            assert data[region] == original[region], f"unacknowledged write {cookie} left a trace"


def test_sigint_with_a_client_not_reading_its_replies(workdir: Path) -> None:
    """A client that stops reading cannot hold up shutdown: exit 0 soon after the grace for its replies."""
    image = random_file(workdir / "busy.img", 32 * MiB, seed=22)
    with serve(image, workdir) as s:

        async def main() -> float:
            client = await RawClient.connect(s.socket)
            await client.handshake()
            for cookie in range(16):  # 16 MiB of replies: far more than the socket buffers hold
                client.request(NBD_CMD_READ, cookie=cookie, offset=cookie * MiB, length=MiB)
            await client.writer.drain()
            await client.reply(MiB)  # the server is answering; from now on nobody reads
            os.kill(s.pid, signal.SIGINT)
            start = time.monotonic()
            code = await asyncio.to_thread(s.cli.finish, 15)
            assert code == 0, s.cli.stderr()
            elapsed = time.monotonic() - start
            await client.close()
            return elapsed

        elapsed = asyncio.run(main())
    assert elapsed < FINISH_GRACE + 4, f"took {elapsed:.1f} s to exit"


def test_shutdown_lets_a_finishing_connection_finish(
    image: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Server shutdown while a connection is already finishing (its client sent NBD_CMD_DISC and does not
    read the replies in flight): the finish is not cut short -- the replies get their grace, then the
    connection is closed, and nothing fails -- instead of the socket being left open."""

    async def main() -> None:
        async with in_process_server(workdir / "nbd.sock", [ExportSpec("", image)]) as srv:
            client = await RawClient.connect(srv.socket)
            try:
                await client.handshake()
                (conn,) = srv.server.exports[""].connections
                for cookie in range(MAX_IN_FLIGHT):  # 16 MiB of replies: more than the socket holds
                    client.request(NBD_CMD_READ, cookie=cookie, offset=cookie * MiB // 2, length=MiB)
                client.request(NBD_CMD_DISC, cookie=99, offset=0, length=0)
                await client.writer.drain()
                await wait_until(lambda: conn._finishing, 10, "the connection to finish")
                await asyncio.wait_for(srv.server.close(), FINISH_GRACE + 10)
                assert srv.server.connection_count == 0
                await client.wait_closed_by_server()
            finally:
                await client.close()

    asyncio.run(main())
    assert_no_errors_logged(caplog)


def test_replies_nobody_reads_are_bounded(
    image: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends requests but does not read the replies stops being read from once
    MAX_IN_FLIGHT replies wait for it: the server does not pile up replies in memory.  Once the client
    reads again, every reply arrives, correct."""
    data = image.read_bytes()
    count = 64

    async def scenario(srv: InProcess) -> None:
        client = await RawClient.connect(srv.socket)
        await client.handshake()
        (conn,) = srv.server.exports[""].connections
        for cookie in range(count):
            client.request(NBD_CMD_READ, cookie=cookie, offset=cookie * 128 * 1024, length=MiB)
        await client.writer.drain()

        def buffered() -> int:
            return conn.queued_bytes

        try:
            await wait_until(lambda: buffered() >= (MAX_IN_FLIGHT - 2) * MiB, 10, "replies to pile up")
            # watch the server for a while: it must stop at about MAX_IN_FLIGHT replies, not go on to `count`
            peak = 0
            loop = asyncio.get_running_loop()
            end = loop.time() + 0.5
            while loop.time() < end:
                peak = max(peak, buffered())
                await asyncio.sleep(0.01)
            # MAX_IN_FLIGHT replies, and up to two more partly taken by the socket's (enlarged) buffer
            assert peak <= (MAX_IN_FLIGHT + 2) * MiB, f"{peak} bytes of replies buffered"
            for _ in range(count):
                error, cookie, got = await client.reply(MiB)
                assert error == 0
                assert got == data[cookie * 128 * 1024 :][:MiB]
        finally:
            await client.close()

    run_in_process(image, workdir, scenario)
    assert_no_errors_logged(caplog)


def test_option_replies_nobody_reads_are_bounded(
    image: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same during the handshake: options sent without reading the replies (each NBD_OPT_LIST
    answer is longer than the question) make the server stop reading, not buffer without end."""
    data = image.read_bytes()
    flood = CLIENT_FLAGS + OPTION.pack(IHAVEOPT, NBD_OPT_LIST, 0) * 150_000  # 2.4 MB of options

    async def scenario(srv: InProcess) -> None:
        client = await RawClient.connect(srv.socket)
        try:
            await client.read_greeting()
            client.writer.write(flood)
            unsent = client.writer.transport.get_write_buffer_size
            # The server takes what the socket buffers hold, then waits for us to read: what we have
            # not sent yet stops shrinking (for a whole second) long before it is all gone.
            loop = asyncio.get_running_loop()
            last, changed = unsent(), loop.time()
            while unsent() and loop.time() - changed < 1.0:
                await asyncio.sleep(0.01)
                if unsent() != last:
                    last, changed = unsent(), loop.time()
            # (what it read: socket buffers and one read, some 0.7 MB here; 2.4 MB without flow control)
            total = len(flood)
            read = total - unsent()
            assert read < total // 2, f"the server read {read} of {total} bytes of options"
        finally:
            client.writer.transport.abort()
        await srv.wait_connections(0)
        await normal_client_reads(srv, data)

    run_in_process(image, workdir, scenario)
    assert_no_errors_logged(caplog)


def test_option_replies_not_yet_read_go_before_transmission_replies(
    image: Path, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Options, NBD_OPT_EXPORT_NAME and a READ sent before reading anything: the option replies still
    queued when transmission starts (more than the socket holds) reach the client first, then the export
    information, then the READ's reply -- in the order of the requests, however slowly the client reads."""
    data = image.read_bytes()
    lists = 9000  # 44 bytes of answer each (NBD_REP_SERVER for the one export, NBD_REP_ACK): ~400 KB
    option_replies = (
        struct.pack(">QIIII", NBD_REP_MAGIC, NBD_OPT_LIST, NBD_REP_SERVER, 4, 0)
        + struct.pack(">QIII", NBD_REP_MAGIC, NBD_OPT_LIST, NBD_REP_ACK, 0)
    ) * lists
    reply = SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, 9) + data[:512]
    total = len(option_replies) + EXPORT_INFO.size + len(reply)

    async def scenario(srv: InProcess) -> None:
        client = await RawClient.connect(srv.socket)
        try:
            await client.read_greeting()
            client.writer.write(CLIENT_FLAGS + OPTION.pack(IHAVEOPT, NBD_OPT_LIST, 0) * lists)
            client.writer.write(OPTION.pack(IHAVEOPT, NBD_OPT_EXPORT_NAME, 0))
            client.request(NBD_CMD_READ, cookie=9, offset=0, length=512)
            await client.writer.drain()
            received = bytearray()
            async with asyncio.timeout(20):
                while len(received) < total:
                    chunk = await client.reader.read(4096)  # slowly: replies are ready meanwhile
                    assert chunk, f"the server closed after {len(received)} of {total} bytes"
                    received += chunk
                    await asyncio.sleep(0)
            assert len(received) == total
            assert received[: len(option_replies)] == option_replies
            size, _flags = EXPORT_INFO.unpack_from(received, len(option_replies))
            assert size == SIZE
            assert received[-len(reply) :] == reply
        finally:
            await client.close()

    run_in_process(image, workdir, scenario)
    assert_no_errors_logged(caplog)


# ---------------------------------------------------------------------------------------------- TLS


def test_tls_handshake_abuse(image: Path, workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With TLS required: garbage instead of a TLS handshake, and a TLS handshake never started after
    NBD_OPT_STARTTLS, are both dropped (the latter by the handshake timeout); plaintext clients are
    refused; TLS clients are served all along."""
    require_tools("openssl")
    caplog.set_level(logging.INFO, logger="cowbackup.nbd")
    creds = make_tls_creds(workdir / "tls")
    data = image.read_bytes()

    async def starttls(srv: InProcess) -> RawClient:
        client = await RawClient.connect(srv.socket)
        await client.read_greeting()
        client.writer.write(CLIENT_FLAGS + OPTION.pack(IHAVEOPT, NBD_OPT_STARTTLS, 0))
        reply = await client.reader.readexactly(20)  # magic, option, NBD_REP_ACK, length 0
        assert struct.unpack(">QIII", reply)[1:] == (NBD_OPT_STARTTLS, NBD_REP_ACK, 0), reply
        return client

    async def garbage_instead_of_tls(srv: InProcess) -> None:
        client = await starttls(srv)
        client.writer.write(b"\x16\x03\x01" + random.Random(5).randbytes(3000))
        await client.wait_closed_by_server()
        await client.close()

    async def tls_never_started(srv: InProcess) -> float:
        client = await starttls(srv)
        start = time.monotonic()
        await client.wait_closed_by_server()
        await client.close()
        return time.monotonic() - start

    async def scenario(srv: InProcess) -> None:
        stalled = asyncio.gather(*(tls_never_started(srv) for _ in range(5)))
        await asyncio.gather(*(garbage_instead_of_tls(srv) for _ in range(5)))
        plain = await arun_tool("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4096", srv.uri())
        assert plain.returncode != 0 and "TLS" in plain.stdout + plain.stderr, plain
        out = await acheck_tool("nbdinfo", "--json", srv.uri(tls_certificates=creds))
        assert '"TLS": true' in out, out
        waited = await stalled
        assert min(waited) >= HANDSHAKE_TIMEOUT * 0.8, waited
        assert max(waited) < HANDSHAKE_TIMEOUT + 3, waited

    async def main() -> None:
        async with in_process_server(
            workdir / "tls.sock",
            [ExportSpec("", image)],
            tls_creds=creds,
            handshake_timeout=HANDSHAKE_TIMEOUT,
        ) as srv:
            await scenario(srv)
            await srv.wait_connections(0)

    asyncio.run(main())
    assert image.read_bytes() == data
    assert sum("handshake not finished" in r.getMessage() for r in caplog.records) == 5
    assert_no_errors_logged(caplog)
