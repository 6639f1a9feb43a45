"""WRITE payloads through the server's receive path: buffered, split, received into reused buffers.

The transmission phase reads a large payload straight into a buffer of its own, keeps those buffers for
the next writes, and shortens the read after such a payload.  Whatever mix of sizes arrives, and however
the client's bytes are cut, every write must land with its own data: a buffer handed out again while
still in use, or a payload mixed up with its neighbour's, shows up here as wrong bytes.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from cowbackup.nbd.client_conn import NBDClient
from cowbackup.nbd.constants import NBD_CMD_FLAG_FUA, NBD_CMD_WRITE
from cowbackup.nbd.uri import NBDAddress

from .conftest import KiB, MiB
from .nbd_server_fixtures import ExportSpec, RawClient, in_process_server

SIZE = 64 * MiB


def _sizes(rng: random.Random, count: int) -> list[int]:
    """A mix: small writes that arrive with their header, and large ones received on their own."""
    choices = [1, 512, 4 * KiB, 8 * KiB - 1, 64 * KiB, 256 * KiB, 256 * KiB + 7, MiB, 3 * MiB + 1]
    return [rng.choice(choices) for _ in range(count)]


def test_pipelined_writes_of_every_size_keep_their_data(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"")
    with image.open("r+b") as f:
        f.truncate(SIZE)
    rng = random.Random(12)
    model = bytearray(SIZE)

    async def body() -> None:
        sock = tmp_path / "nbd.sock"
        async with in_process_server(sock, [ExportSpec("", image)]):
            client = await NBDClient.connect(NBDAddress(socket=str(sock)))
            try:
                for _ in range(3):  # later rounds reuse the buffers the earlier ones freed
                    writes = []
                    # Non-overlapping slots, so the order the server applies them in does not matter.
                    slots = rng.sample(range(SIZE // (4 * MiB)), 12)
                    for slot, size in zip(slots, _sizes(rng, 12), strict=True):
                        data = rng.randbytes(size)
                        offset = slot * 4 * MiB + rng.randrange(0, 4 * MiB - size + 1)
                        model[offset : offset + size] = data
                        writes.append(client.write(offset, data))
                    await asyncio.gather(*writes)
                buf = bytearray(SIZE)
                await client.read(0, memoryview(buf)[: 32 * MiB])
                await client.read(32 * MiB, memoryview(buf)[32 * MiB :])
                assert buf == model
            finally:
                await client.close()

    asyncio.run(body())
    assert image.read_bytes() == model


def test_zero_length_writes_succeed(tmp_path: Path) -> None:
    """A WRITE of 0 bytes has no payload: it succeeds (as with qemu-nbd) and the next request is fine."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))

    async def body() -> None:
        sock = tmp_path / "nbd.sock"
        async with in_process_server(sock, [ExportSpec("", image)]):
            client = await RawClient.connect(sock)
            try:
                await client.handshake()
                client.request(NBD_CMD_WRITE, 1, 4096, 0)
                client.request(NBD_CMD_WRITE, 2, 0, 3, flags=NBD_CMD_FLAG_FUA)
                client.writer.write(b"abc")
                assert await client.reply() == (0, 1, b"")
                assert await client.reply() == (0, 2, b"")
            finally:
                await client.close()

    asyncio.run(body())
    assert image.read_bytes()[:4] == b"abc\0"
