"""The QMP server: greeting, negotiation, framing, malformed input, control and block commands.

Our server runs in the test's event loop; clients are the ``qemu.qmp`` library and raw sockets (for the
bytes no library would send). The malformed-input script is also replayed against the real
qemu-storage-daemon, and both transcripts must match once versions are normalised.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecuteError, QMPClient

from cowbackup.daemon import Daemon
from cowbackup.qmp.commands import QMPError, arg_enum, arg_int, arg_str, no_extra
from cowbackup.qmp.protocol import QMPStreamParser
from cowbackup.qmp.server import QMPServer

from .conftest import wait_listening

T = TypeVar("T")
TIMEOUT = 30


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


@asynccontextmanager
async def qmp_server(path: Path) -> AsyncIterator[QMPServer]:
    daemon = Daemon()
    server = QMPServer(daemon)
    await server.listen_unix(str(path))
    try:
        yield server
    finally:
        await server.close()
        await daemon.close()


class RawMonitor:
    """A byte-level QMP client: send exactly these bytes, read replies line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> RawMonitor:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def recv(self) -> Any:
        line = await asyncio.wait_for(self.reader.readline(), 5)
        assert line, "connection closed"
        return json.loads(line)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, execute: str, **kwargs: Any) -> Any:
        msg: dict[str, Any] = {"execute": execute}
        if kwargs:
            msg["arguments"] = kwargs
        await self.send(json.dumps(msg).encode())
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


# Each chunk is followed by a sentinel query, which also proves that the session goes on.
MALFORMED_SCRIPT: list[bytes] = [
    b'{"execute":"query-version"}',
    b'{"execute":"qmp_capabilities", "arguments":{"enable":["x"]}}',
    b'{"execute":"qmp_capabilities", "arguments":{"foo":1}}',
    b'{"execute":"qmp_capabilities", "arguments":{"enable":"oob"}, "id":3}',
    b'{"execute":"qmp_capabilities", "id": [1,{"a":2}]}',
    b'{"execute":"qmp_capabilities"}',
    b'{"execute":"foo","id":5}',
    b'{"execute": \n}',
    b"[1,2]",
    b'"abc"',
    b'{"id":1}',
    b'{"execute":"query-jobs","arguments":[], "id": 7}',
    b'{"execute":"query-jobs","foo":1, "id": 8}',
    b'{"execute":1, "id": 9}',
    b'{"execute":"query-jobs","exec-oob":"x"}',
    b'{"exec-oob":"query-jobs"}',
    b'{"a" 1}',
    b"{1:2}",
    b'{"a":1,}',
    b"@",
    b'{"execute":"x"]',
    b"]",
    b'{"execute":"query-jobs"} garbage',
    b'{"execute":"query-jobs","arguments":{"x":1}}',
    b'{"execute":"query-jobs","id":1, "id":2}',
    b'{"execute":"query-jobs","id":null}',
    b'{"execute":"query-jobs","id":"\\u00e9"}',
    b"{'execute':'query-jobs', 'id':'a\\'b\"c'}",
    b'{"a":"\x01"} {"execute":"query-jobs","id":3}\n',
    b'\xff{"execute":"query-jobs","id":4}',
    b'\x04 {"execute":"query-jobs","id":6}',
    b'{"id":"\xc3"}',
    b'{"execute":"query-jobs","id":01}',
    b"[" * 1030 + b"]" * 6 + b"\n",
    b"]]]",
    b'{"execute":"query-jobs","id":"end"}',
]


async def replay(path: Path) -> list[Any]:
    """The greeting and every reply to MALFORMED_SCRIPT, in order."""
    mon = await RawMonitor.connect(path)
    try:
        out = [await mon.recv()]
        for n, data in enumerate(MALFORMED_SCRIPT):
            await mon.send(data)
            await mon.send(b'\n{"execute": "query-jobs", "id": "sync-%d"}' % n)
            while (reply := await mon.recv()).get("id") != f"sync-{n}":
                out.append(reply)
        return out
    finally:
        await mon.close()


def normalise(transcript: list[Any]) -> list[Any]:
    """Drop what legitimately differs between QEMU and us: the version and the command list."""
    out = []
    for msg in transcript:
        if "QMP" in msg:
            msg["QMP"]["version"] = "V"
        elif isinstance(msg.get("return"), dict) and "package" in msg["return"]:
            msg["return"] = "V"
        out.append(msg)
    return out


# ------------------------------------------------------------------------------------ protocol core


def test_parser_whole_and_bytewise_agree() -> None:
    data = b"".join(MALFORMED_SCRIPT)
    whole = QMPStreamParser().feed(data)
    parser = QMPStreamParser()
    bytewise = [item for i in range(len(data)) for item in parser.feed(data[i : i + 1])]
    assert whole == bytewise


def test_argument_helpers_use_qemu_messages() -> None:
    with pytest.raises(QMPError, match=r"^Parameter 'device' is missing$"):
        arg_str({}, "device")
    with pytest.raises(QMPError, match=r"^Invalid parameter type for 'device', expected: string$"):
        arg_str({"device": 1}, "device")
    with pytest.raises(QMPError, match=r"^Invalid parameter type for 'x.speed', expected: integer$"):
        arg_int({"speed": True}, "speed", prefix="x")
    with pytest.raises(QMPError, match=r"^Parameter 'sync' does not accept value 'x'$"):
        arg_enum({"sync": "x"}, "sync", ("full",))
    with pytest.raises(QMPError, match=r"^Parameter 'x' is unexpected$"):
        no_extra({"x": 1}, ())
    assert arg_str({}, "bitmap", None) is None


# ------------------------------------------------------------------------------------ sessions


def test_greeting_negotiation_and_id_echo(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"

    async def main() -> None:
        async with qmp_server(sock):
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            mon = await RawMonitor.connect(sock)
            greeting = await mon.recv()
            assert greeting["QMP"]["capabilities"] == ["oob"]
            assert greeting["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
            assert greeting["QMP"]["version"]["package"].startswith("cowbackup ")
            before = await mon.cmd("query-version")
            assert before["error"] == {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            }
            await mon.send(b'{"execute": "qmp_capabilities", "id": {"x": [1, "y"]}}')
            assert await mon.recv() == {"return": {}, "id": {"x": [1, "y"]}}
            again = await mon.cmd("qmp_capabilities")
            assert again["error"]["class"] == "CommandNotFound"
            assert again["error"]["desc"] == "Capabilities negotiation is already complete, command ignored"
            await mon.send(b'{"execute": "nope", "id": 7}')
            assert await mon.recv() == {
                "id": 7,
                "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
            }
            await mon.close()

    run(main())


def test_malformed_input_answers(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"

    async def main() -> list[Any]:
        async with qmp_server(sock):
            return await replay(sock)

    transcript = run(main())
    descs = [m["error"]["desc"] for m in transcript if "error" in m]
    for expected in (
        "JSON parse error, expecting value",
        "QMP input must be a JSON object",
        "QMP input lacks member 'execute'",
        "QMP input member 'arguments' must be an object",
        "QMP input member 'foo' is unexpected",
        "QMP input member 'execute' must be a string",
        "JSON parse error, duplicate key",
        "JSON parse error, stray '@'",
        "JSON parse error, invalid keyword 'garbage'",
        "JSON nesting depth limit exceeded",
        "JSON parse error, invalid UTF-8 sequence in string",
    ):
        assert expected in descs
    assert transcript[-1] == {"return": [], "id": "end"}


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon")
def test_malformed_input_matches_qemu_storage_daemon(tmp_path: Path) -> None:
    ours_sock, qsd_sock = tmp_path / "ours.sock", tmp_path / "qsd.sock"

    async def main() -> tuple[list[Any], list[Any]]:
        async with qmp_server(ours_sock):
            ours = await replay(ours_sock)
        proc = await asyncio.create_subprocess_exec(
            "qemu-storage-daemon",
            "--chardev",
            f"socket,id=m,path={qsd_sock},server=on,wait=off",
            "--monitor",
            "chardev=m",
        )
        try:
            await wait_listening(qsd_sock, proc, "qemu-storage-daemon")
            theirs = await replay(qsd_sock)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        return ours, theirs

    ours, theirs = run(main())
    assert normalise(ours) == normalise(theirs)


def test_control_commands_and_quit(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"

    async def main() -> None:
        async with qmp_server(sock) as server:
            client = QMPClient("t")
            await client.connect(str(sock))
            version = await client.execute("query-version")
            assert isinstance(version, dict)
            assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
            commands: Any = await client.execute("query-commands")
            names = {c["name"] for c in commands}
            assert {"qmp_capabilities", "quit", "blockdev-backup", "job-finalize"} <= names
            with pytest.raises(ExecuteError) as err:
                await client.execute("query-version", {"x": 1})
            assert err.value.error.error.desc == "Parameter 'x' is unexpected"
            assert not server.shutdown_requested
            assert await client.execute("quit") == {}
            await asyncio.wait_for(server.wait_shutdown(), 5)
            await client.disconnect()

    run(main())


def test_garbage_and_disconnects_affect_nobody_else(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"

    async def main() -> None:
        async with qmp_server(sock):
            good = QMPClient("good")
            await good.connect(str(sock))
            bad = await RawMonitor.connect(sock)
            await bad.recv()
            await bad.send(b"\x00\xff{{{{ not json at all ]]]]")
            rude = await RawMonitor.connect(sock)
            await rude.send(b'{"execute":"qmp_capabilities"}{"execute":"query-jobs"}')
            await rude.close()  # gone before reading its replies
            await bad.close()
            assert await good.execute("query-jobs") == []
            await good.disconnect()

    run(main())


# ------------------------------------------------------------------------------------ block commands


def test_blockdev_add_query_del(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 1024 * 1024)

    async def main() -> None:
        async with qmp_server(sock):
            client = QMPClient("t")
            await client.connect(str(sock))
            await client.execute(
                "blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(image)}
            )
            nodes = await client.execute("query-named-block-nodes")
            assert isinstance(nodes, list)
            (node,) = nodes
            assert node["node-name"] == "f0"
            assert node["drv"] == "file"
            assert node["file"] == str(image)
            assert node["ro"] is False
            assert node["image"]["virtual-size"] == 1024 * 1024
            assert node["image"]["filename"] == str(image)
            assert node["encrypted"] is False
            assert node["detect_zeroes"] == "off"
            assert node["write_threshold"] == 0
            assert node["cache"] == {"writeback": True, "direct": False, "no-flush": False}
            with pytest.raises(ExecuteError) as err:
                await client.execute("blockdev-del", {"node-name": "nope"})
            assert err.value.error.error.class_ == "GenericError"
            assert err.value.error.error.desc == "Failed to find node with node-name='nope'"
            with pytest.raises(ExecuteError) as err:
                await client.execute("blockdev-add", {"node-name": "x"})
            assert err.value.error.error.desc == "Parameter 'driver' is missing"
            await client.execute("blockdev-del", {"node-name": "f0"})
            assert await client.execute("query-named-block-nodes") == []
            await client.disconnect()

    run(main())
