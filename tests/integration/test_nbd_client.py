"""The NBD client (``NBDClient``), the ``nbd`` block driver and NBD URIs in ``cowbackup backup``.

Against real servers started per test (see :mod:`nbd_peers`): ``qemu-nbd`` for the QEMU semantics
(persistent or not, read-only, export names, TLS), ``nbdkit`` for what qemu-nbd cannot do on demand --
random sparse data, injected errors, delays and a request log that shows the server's concurrency.
Every coroutine runs under :data:`DEADLINE`, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
import socket
import subprocess
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cowbackup.block.drivers import open_node
from cowbackup.block.drivers.nbd import NBDNode, nbd_options_from_uri
from cowbackup.block.errors import BlockError
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import RequestFlags, Status
from cowbackup.nbd.client_conn import ConnectError, ConnectionLost, NBDClient
from cowbackup.nbd.errors import StateError
from cowbackup.nbd.uri import NBDAddress

from .conftest import (
    KiB,
    MiB,
    RunCli,
    SegmentKind,
    allocated,
    build_image,
    layout,
    qemu_img_compare,
    random_file,
)
from .nbd_peers import Peer, make_tls_creds, nbdkit, nbdkit_log_requests, qemu_nbd, require, wait_until

T = TypeVar("T")

#: Longest any one test's coroutine may run.
DEADLINE = 30.0
SIZE = 64 * MiB

#: Data, holes and written zeros, 1 MiB aligned (tmpfs reports holes at page granularity).
SPARSE_PATTERN: list[tuple[int, SegmentKind]] = [
    (2 * MiB, "data"),
    (3 * MiB, "hole"),
    (1 * MiB, "zero"),
    (1 * MiB, "hole"),
    (512 * KiB, "data"),
    (1536 * KiB, "hole"),
]


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, DEADLINE)

    return asyncio.run(bounded())


async def open_nbd(graph: BlockGraph, peer: Peer, **options: Any) -> NBDNode:
    node = await open_node(
        graph, {"driver": "nbd", "node-name": "nbd0", "server": peer.server_options(), **options}
    )
    assert isinstance(node, NBDNode)
    return node


async def read_all(node: NBDNode) -> bytes:
    buf = bytearray(node.size)
    await node.read(0, buf)
    return bytes(buf)


@pytest.fixture
def need_qemu_nbd() -> None:
    require("qemu-nbd", "qemu-img")


@pytest.fixture
def need_nbdkit() -> None:
    require("nbdkit")


@pytest.fixture
def sparse_source(workdir: Path) -> Path:
    return build_image(workdir / "source.img", SIZE, layout(SIZE, SPARSE_PATTERN), seed=7).path


# ---------------------------------------------------------------------------------------------- qemu-nbd


@pytest.mark.usefixtures("need_qemu_nbd")
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "one-client"])
def test_qemu_nbd_round_trips(workdir: Path, persistent: bool) -> None:
    """Unaligned, large (> max block size), FUA, zero, trim and flush requests match a byte model."""
    image = random_file(workdir / "disk.img", SIZE, seed=1)
    model = bytearray(image.read_bytes())
    rng = random.Random(2)

    async def body(peer: Peer) -> None:
        graph = BlockGraph()
        # discard=unmap on our node too: without it the node drops the trim before it is sent, as QEMU's.
        node = await open_nbd(graph, peer, discard="unmap")
        try:
            assert node.size == SIZE
            assert not node.read_only
            assert node.limits.request_alignment == 1
            assert node.limits.max_transfer == 32 * MiB  # qemu-nbd's maximum block size
            assert node.describe() == {"file": peer.uri()}

            data = rng.randbytes(100_001)
            await node.write(12_345, data)
            model[12_345 : 12_345 + len(data)] = data

            big = rng.randbytes(40 * MiB + 3)  # split by the block layer at 32 MiB
            await node.write(3 * MiB + 7, big, RequestFlags.FUA)
            model[3 * MiB + 7 : 3 * MiB + 7 + len(big)] = big

            await node.write_zeroes(1000, 5000)
            model[1000:6000] = bytes(5000)
            await node.write_zeroes(48 * MiB + 1, 3 * MiB, RequestFlags.MAY_UNMAP)
            model[48 * MiB + 1 : 51 * MiB + 1] = bytes(3 * MiB)

            await node.discard(56 * MiB, 2 * MiB)  # --discard=unmap: a hole in the raw file
            model[56 * MiB : 58 * MiB] = bytes(2 * MiB)
            ext = await node.block_status(56 * MiB, 2 * MiB)
            assert ext.is_zero and not ext.is_data and ext.length == 2 * MiB
            await node.flush()

            # The client itself splits a read larger than the server's maximum block size.
            buf = bytearray(40 * MiB)
            await node.client.read(8 * MiB, buf)
            assert buf == model[8 * MiB : 48 * MiB]
            assert await read_all(node) == model
        finally:
            await graph.close_all()

    with qemu_nbd(workdir, image, persistent=persistent) as peer:
        run(body(peer))
        if not persistent:
            # qemu-nbd serves one client and exits cleanly once it sends NBD_CMD_DISC.
            assert peer.wait_exit(10) == 0, peer.stderr()
    assert image.read_bytes() == model


@pytest.mark.usefixtures("need_qemu_nbd")
def test_qemu_nbd_block_status_of_sparse_image(workdir: Path) -> None:
    built = build_image(workdir / "sparse.img", SIZE, layout(SIZE, SPARSE_PATTERN), seed=3)

    async def body(peer: Peer) -> None:
        graph = BlockGraph()
        node = await open_nbd(graph, peer, **{"read-only": True})
        try:
            assert node.client.can_block_status
            extents = [ext async for ext in node.extents()]
            assert sum(e.length for e in extents) == SIZE
            for seg in built.segments:
                covering = [e for e in extents if e.offset < seg.end and seg.offset < e.end]
                if seg.kind == "data":
                    assert all(e.is_data for e in covering), (seg, covering)
                elif seg.kind == "hole":
                    assert all(e.is_zero and not e.is_data for e in covering), (seg, covering)
            assert await read_all(node) == built.path.read_bytes()
        finally:
            await graph.close_all()

    with qemu_nbd(workdir, built.path, read_only=True) as peer:
        run(body(peer))


@pytest.mark.usefixtures("need_qemu_nbd")
def test_qemu_nbd_read_only_export(workdir: Path) -> None:
    image = random_file(workdir / "ro.img", 4 * MiB, seed=4)

    async def body(peer: Peer) -> None:
        graph = BlockGraph()
        node = await open_nbd(graph, peer)  # not asked read-only: the server's flag decides
        try:
            assert node.read_only and node.client.read_only
            with pytest.raises(OSError, match="read-only") as refused:
                await node.write(0, b"x" * 512)
            assert refused.value.errno == errno.EPERM
            # Sent anyway, the server refuses it; its error and message arrive as an OSError.
            # (qemu-nbd 7.2 answers NBD_EINVAL "Export is read-only"; newer ones NBD_EPERM.)
            with pytest.raises(OSError, match="read-only") as server_refused:
                await node.client.write(0, b"x" * 512)
            assert server_refused.value.errno in (errno.EPERM, errno.EINVAL)
            assert await read_all(node) == image.read_bytes()  # the connection goes on
        finally:
            await graph.close_all()

    with qemu_nbd(workdir, image, read_only=True) as peer:
        run(body(peer))


@pytest.mark.usefixtures("need_qemu_nbd")
def test_unknown_export_and_unreachable_server(workdir: Path) -> None:
    image = random_file(workdir / "named.img", MiB, seed=5)

    async def body(peer: Peer) -> None:
        graph = BlockGraph()
        with pytest.raises(BlockError, match=r"Could not connect to .*export 'nope' not found"):
            await open_nbd(graph, peer, export="nope")
        node = await open_nbd(graph, peer, export="disk0")
        assert node.size == MiB
        await graph.remove("nbd0")
        missing = {"type": "unix", "path": str(workdir / "missing.sock")}
        with pytest.raises(BlockError, match=r"Could not connect to .*missing\.sock.*No such file"):
            await open_node(graph, {"driver": "nbd", "node-name": "x", "server": missing})
        assert not graph.nodes

    with qemu_nbd(workdir, image, export="disk0") as peer:
        run(body(peer))


@pytest.mark.usefixtures("need_qemu_nbd")
def test_driver_options(workdir: Path) -> None:
    image = random_file(workdir / "opts.img", MiB, seed=6)

    async def body(peer: Peer) -> None:
        graph = BlockGraph()
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "Parameter 'server' is missing"),
            ({"server": {"type": "unix"}}, "Parameter 'server.path' is missing"),
            ({"server": {"type": "inet", "host": "localhost", "port": "http"}}, "server.port"),
            ({"server": {"type": "fd", "str": "3"}}, "server.type=fd is not supported"),
            ({"server": {**peer.server_options(), "abstract": True}}, "'server.abstract' is unexpected"),
            ({"server": peer.server_options(), "reconnect-delay": 5}, "'reconnect-delay' is unexpected"),
        ]
        for options, message in cases:
            with pytest.raises(BlockError, match=message):
                await open_node(graph, {"driver": "nbd", "node-name": "x", **options})
        assert not graph.nodes  # the connection of the refused node was closed with it

    with qemu_nbd(workdir, image) as peer:
        run(body(peer))


def test_nbd_options_from_uri() -> None:
    assert nbd_options_from_uri("nbd+unix:///disk?socket=/run/s.sock") == {
        "driver": "nbd",
        "server": {"type": "unix", "path": "/run/s.sock"},
        "export": "disk",
    }
    assert nbd_options_from_uri("nbd://example.com:10810/") == {
        "driver": "nbd",
        "server": {"type": "inet", "host": "example.com", "port": "10810"},
        "export": "",
    }
    assert nbd_options_from_uri("nbds://h/e?tls-certificates=/etc/pki/qemu")["tls-creds"] == "/etc/pki/qemu"
    with pytest.raises(BlockError, match="tls-certificates"):
        nbd_options_from_uri("nbds+unix:///?socket=/s")
    with pytest.raises(BlockError, match="unknown scheme"):
        nbd_options_from_uri("http://example.com/")


# ---------------------------------------------------------------------------------------------- nbdkit


@pytest.mark.usefixtures("need_nbdkit")
def test_nbdkit_memory_concurrent_requests(workdir: Path) -> None:
    """Many overlapping-free requests at once on one connection, checked against a model."""
    rng = random.Random(8)
    model = bytearray(SIZE)

    async def body(peer: Peer) -> None:
        client = await NBDClient.connect(peer.address())
        try:
            assert client.size == SIZE
            assert client.max_request == 32 * MiB  # nbdkit sends no maximum: our own cap
            writes = []
            for i in range(64):
                data = rng.randbytes(rng.randrange(1, 256 * KiB))
                offset = i * MiB + rng.randrange(0, 512 * KiB)
                model[offset : offset + len(data)] = data
                writes.append(client.write(offset, data))
            await asyncio.gather(*writes)
            await client.write_zeroes(5 * MiB, MiB, no_hole=True)
            await client.trim(9 * MiB, MiB)
            model[5 * MiB : 6 * MiB] = bytes(MiB)
            model[9 * MiB : 10 * MiB] = bytes(MiB)
            bufs = [bytearray(MiB) for _ in range(64)]
            await asyncio.gather(*(client.read(i * MiB, buf) for i, buf in enumerate(bufs)))
            assert b"".join(bufs) == model
            assert client.in_flight == 0
        finally:
            await client.close()
            await client.close()  # idempotent
        with pytest.raises(StateError):
            await client.flush()

    with nbdkit(workdir, "memory", f"size={SIZE}") as peer:
        run(body(peer))


@pytest.mark.usefixtures("need_nbdkit")
def test_nbdkit_block_size_policy(workdir: Path) -> None:
    """A 4 KiB minimum and 1 MiB maximum: the node aligns and splits, the server never complains."""

    async def body(peer: Peer) -> None:
        graph = BlockGraph()
        node = await open_nbd(graph, peer)
        try:
            assert node.limits.request_alignment == 4096
            assert node.limits.max_transfer == MiB
            model = bytearray(SIZE)
            data = random.Random(9).randbytes(3 * MiB + 1001)
            await node.write(4097, data)
            model[4097 : 4097 + len(data)] = data
            await node.write_zeroes(100, 5000)
            model[100:5100] = bytes(5000)
            ext = await node.block_status(4097, 1000)  # unaligned: asked for its aligned block
            assert ext.offset == 4097 and ext.is_data
            assert await read_all(node) == model
        finally:
            await graph.close_all()

    params = ("blocksize-minimum=4096", "blocksize-maximum=1M", "blocksize-error-policy=error")
    with nbdkit(workdir, "memory", f"size={SIZE}", *params, filters=["blocksize-policy"]) as peer:
        run(body(peer))


@pytest.mark.usefixtures("need_nbdkit")
def test_nbdkit_sparse_random_matches_nbdcopy_and_nbdinfo(workdir: Path) -> None:
    require("nbdcopy", "nbdinfo")
    params = (f"size={SIZE}", "seed=7", "percent=30", "runlength=262144")
    with nbdkit(workdir, "sparse-random", *params) as peer:
        copy = workdir / "nbdcopy.img"
        subprocess.run(["nbdcopy", peer.uri(), str(copy)], check=True, timeout=DEADLINE)
        proc = subprocess.run(
            ["nbdinfo", "--map", "--json", peer.uri()], check=True, timeout=DEADLINE, capture_output=True
        )
        their_map = json.loads(proc.stdout)

        async def body() -> None:
            graph = BlockGraph()
            node = await open_nbd(graph, peer, **{"read-only": True})
            try:
                ours = [e async for e in node.extents()]
                assert await read_all(node) == copy.read_bytes()
            finally:
                await graph.close_all()
            assert any(e.is_data for e in ours) and any(not e.is_data for e in ours)
            holes = [(e.offset, e.length) for e in ours if e.flags == Status.ZERO | Status.ALLOCATED]
            data = [(e.offset, e.length) for e in ours if e.is_data]
            assert holes == [(m["offset"], m["length"]) for m in their_map if m["type"] == 3]
            assert data == [(m["offset"], m["length"]) for m in their_map if m["type"] == 0]

        run(body())


@pytest.mark.usefixtures("need_nbdkit")
def test_nbdkit_read_errors_surface(workdir: Path) -> None:
    trigger = workdir / "inject-eio"
    params = (f"size={SIZE}", "error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={trigger}")

    async def body(peer: Peer) -> None:
        graph = BlockGraph()
        node = await open_nbd(graph, peer)
        try:
            await node.write(0, b"a" * 4096)
            trigger.touch()
            with pytest.raises(OSError, match=r"Input/output error|EIO") as failed:
                await node.read(0, bytearray(4096))
            assert failed.value.errno == errno.EIO
            # Pipelined failures: every one is reported, none is lost or left hanging.
            results = await asyncio.gather(
                *(node.read(i * MiB, bytearray(64 * KiB)) for i in range(20)), return_exceptions=True
            )
            assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results), results
            trigger.unlink()
            buf = bytearray(4096)
            await node.read(0, buf)  # the connection survived the errors
            assert buf == b"a" * 4096
        finally:
            await graph.close_all()

    with nbdkit(workdir, "memory", *params, filters=["error"]) as peer:
        run(body(peer))


@pytest.mark.usefixtures("need_nbdkit")
def test_nbdkit_delay_requests_are_pipelined(workdir: Path) -> None:
    """16 slow reads sent together: the server's log shows them in flight at the same time."""
    log = workdir / "requests.log"
    count = 16

    async def body(peer: Peer) -> None:
        client = await NBDClient.connect(peer.address())
        try:
            reads = asyncio.gather(*(client.read(i * MiB, bytearray(4096)) for i in range(count)))
            await wait_until(lambda: client.in_flight == count, "all reads to be sent")
            await reads
        finally:
            await client.close()

    with nbdkit(
        workdir, "memory", f"size={SIZE}", "delay-read=200ms", f"logfile={log}", filters=["log", "delay"]
    ) as peer:
        run(body(peer))
    started, most_at_once = nbdkit_log_requests(log)
    assert started == count
    assert most_at_once >= count // 2, f"the server saw at most {most_at_once} reads at once"


@pytest.mark.usefixtures("need_nbdkit")
def test_close_waits_for_requests_and_cancelled_reads_drop_their_data(workdir: Path) -> None:
    async def body(peer: Peer) -> None:
        client = await NBDClient.connect(peer.address())
        await client.write(0, b"d" * (4 * MiB))

        # A read whose caller gives up: the reply still arrives, its data never lands in the buffer.
        abandoned = bytearray(b"\xff" * 4096)
        task = asyncio.ensure_future(client.read(0, abandoned))
        await wait_until(lambda: client.in_flight == 1, "the read to be sent")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        fresh = bytearray(4096)
        await client.read(MiB, fresh)
        assert fresh == b"d" * 4096
        await wait_until(lambda: client.in_flight == 0, "the abandoned read's reply")
        assert abandoned == b"\xff" * 4096

        # close() refuses new requests at once but lets those in flight finish first.
        bufs = [bytearray(4096) for _ in range(4)]
        reads = asyncio.gather(*(client.read(i * MiB, buf) for i, buf in enumerate(bufs)))
        await wait_until(lambda: client.in_flight == 4, "the reads to be sent")
        closing = asyncio.ensure_future(client.close())
        await asyncio.sleep(0)
        with pytest.raises(StateError, match="closing"):
            await client.read(0, bytearray(512))
        await reads
        assert all(buf == b"d" * 4096 for buf in bufs)
        await closing
        assert client.state.value == "closed"

    with nbdkit(workdir, "memory", f"size={SIZE}", "delay-read=200ms", filters=["delay"]) as peer:
        run(body(peer))


def test_connect_timeout_when_the_server_never_speaks(workdir: Path) -> None:
    """A socket that accepts (the kernel's backlog) but never sends a greeting."""
    path = workdir / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(1)
        with pytest.raises(ConnectError, match=r"no answer within 0\.3 s"):
            run(NBDClient.connect(NBDAddress(socket=str(path)), connect_timeout=0.3))


@pytest.mark.usefixtures("need_nbdkit")
def test_server_killed_mid_request_fails_every_request(workdir: Path) -> None:
    log = workdir / "requests.log"

    async def body(peer: Peer) -> None:
        graph = BlockGraph()
        node = await open_nbd(graph, peer)
        client = node.client
        reads = [asyncio.ensure_future(node.read(i * MiB, bytearray(64 * KiB))) for i in range(8)]
        await wait_until(lambda: nbdkit_log_requests(log)[0] == 8, "the server to receive 8 reads")
        peer.kill()
        done, pending = await asyncio.wait(reads, timeout=5)
        assert not pending, "requests still hang after the server died"
        for task in done:
            err = task.exception()
            assert isinstance(err, ConnectionLost) and err.errno == errno.EIO, err
            assert "lost" in str(err)
        with pytest.raises(ConnectionLost):  # later requests fail at once
            await node.read(0, bytearray(512))
        assert client.in_flight == 0
        with pytest.raises(ConnectionLost):
            await node.flush()
        await node.close()  # closing a broken connection is quick and clean
        await node.close()

    with nbdkit(
        workdir, "memory", f"size={SIZE}", "delay-read=30", f"logfile={log}", filters=["log", "delay"]
    ) as peer:
        run(body(peer))


# ---------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tls_creds(tmp_path_factory.mktemp("tls") / "creds")


@pytest.mark.usefixtures("need_qemu_nbd")
def test_tls_with_qemu_nbd(workdir: Path, tls_creds: Path, run_cli: RunCli) -> None:
    image = random_file(workdir / "tls.img", 4 * MiB, seed=10)

    async def body(tls_peer: Peer, plain_peer: Peer) -> None:
        graph = BlockGraph()
        node = await open_nbd(graph, tls_peer, **{"tls-creds": str(tls_creds)})
        try:
            assert await read_all(node) == image.read_bytes()
            await node.write(MiB, b"secret" * 1000)
            await node.flush()
        finally:
            await graph.remove("nbd0")
        with pytest.raises(BlockError, match="requires TLS"):
            await open_nbd(graph, tls_peer)
        with pytest.raises(ConnectError, match="does not support TLS"):
            await NBDClient.connect(
                NBDAddress(socket=str(plain_peer.socket_path), tls_certificates=str(tls_creds))
            )

    other = random_file(workdir / "plain.img", MiB, seed=11)
    with (
        qemu_nbd(workdir, image, tls_dir=tls_creds) as tls_peer,
        qemu_nbd(workdir, other, name="plain") as plain,
    ):
        run(body(tls_peer, plain))
        # The CLI takes the credentials from the URI.
        uri = NBDAddress(socket=str(tls_peer.socket_path), tls=True, tls_certificates=str(tls_creds)).to_uri()
        assert uri.startswith("nbds+unix:///?socket=")
        proc = run_cli("backup", uri, str(workdir / "tls-backup.img"))
        assert proc.returncode == 0, proc.stderr
    assert image.read_bytes()[MiB : MiB + 6000] == b"secret" * 1000
    assert (workdir / "tls-backup.img").read_bytes() == image.read_bytes()


@pytest.mark.usefixtures("need_qemu_nbd")
def test_tls_over_tcp_checks_the_host_name(workdir: Path, tls_creds: Path) -> None:
    """Over TCP the certificate must name the host (127.0.0.1 is in its subjectAltName), as in QEMU."""
    image = random_file(workdir / "tcp.img", MiB, seed=14)

    async def body(peer: Peer) -> None:
        graph = BlockGraph()
        assert peer.server_options()["type"] == "inet"
        node = await open_nbd(graph, peer, **{"tls-creds": str(tls_creds)})
        assert await read_all(node) == image.read_bytes()
        await graph.remove("nbd0")
        with pytest.raises(BlockError, match=r"TLS handshake failed: .*mismatch"):
            await open_nbd(graph, peer, **{"tls-creds": str(tls_creds), "tls-hostname": "wrong.example"})

    with qemu_nbd(workdir, image, tls_dir=tls_creds, tcp=True) as peer:
        run(body(peer))


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.mark.usefixtures("need_qemu_nbd")
def test_cli_backup_from_nbd_source(workdir: Path, run_cli: RunCli, sparse_source: Path) -> None:
    target = workdir / "backup.img"
    with qemu_nbd(workdir, sparse_source, read_only=True) as peer:
        proc = run_cli("backup", peer.uri(), str(target))
    assert proc.returncode == 0, proc.stderr
    qemu_img_compare(sparse_source, target)
    # The source's holes were skipped (base:allocation), so the copy is as sparse as the source.
    assert allocated(target) <= allocated(sparse_source)


@pytest.mark.usefixtures("need_qemu_nbd")
def test_cli_backup_to_nbd_target(workdir: Path, run_cli: RunCli, sparse_source: Path) -> None:
    target = random_file(workdir / "remote.img", SIZE, seed=12)  # old contents everywhere
    small = random_file(workdir / "small.img", SIZE // 2, seed=13)
    with qemu_nbd(workdir, target) as peer, qemu_nbd(workdir, small, name="small") as small_peer:
        proc = run_cli("backup", str(sparse_source), peer.uri())  # no --force needed
        assert proc.returncode == 0, proc.stderr
        assert "target allocates" not in proc.stderr
        refused = run_cli("backup", str(sparse_source), small_peer.uri())
    qemu_img_compare(sparse_source, target)  # the holes were zeroed on the remote side too
    assert refused.returncode == 2
    assert "must exist with the source's size" in refused.stderr


@pytest.mark.usefixtures("need_qemu_nbd")
def test_cli_backup_nbd_errors(workdir: Path, run_cli: RunCli, sparse_source: Path) -> None:
    proc = run_cli("backup", f"nbd+unix:///?socket={workdir / 'none.sock'}", str(workdir / "t.img"))
    assert proc.returncode == 2
    assert "Could not connect to" in proc.stderr
    assert not (workdir / "t.img").exists()
    with qemu_nbd(workdir, sparse_source, read_only=True) as peer:
        proc = run_cli("backup", str(sparse_source), peer.uri())
    assert proc.returncode == 2
    assert "read-only NBD export" in proc.stderr
