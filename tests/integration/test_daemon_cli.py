"""``cowbackup daemon`` (qemu-storage-daemon's command line) and the Daemon's NBD export verbs.

The command runs as a subprocess on a tmp raw image; readiness is the pidfile, which is written once
every option has been carried out (as QEMU does), waited for with a deadline.  Real peers check the
export: qemu-io writes and reads through it, nbdinfo describes it.  Bad options must give exit status 1
and one line on stderr, with QEMU's message.  The export verbs are also driven in-process, with our own
NBD client connected to the export, and over QMP with the ``qemu.qmp`` client when the QMP server exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cowbackup.block.errors import BlockError
from cowbackup.daemon import Daemon
from cowbackup.jobs.events import Event

from .conftest import CliProcess, MiB, RunCli, StartCli
from .nbd_peers import require

T = TypeVar("T")

#: Longest the daemon may take to start or to stop.
DEADLINE = 20.0


def wait_for(predicate: Callable[[], bool], what: str, proc: CliProcess, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` until it holds; fail at the deadline or when the daemon exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.proc.poll() is not None:
            pytest.fail(f"cowbackup daemon exited ({proc.proc.returncode}) before {what}: {proc.stderr()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.02)


def run_tool(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, f"{argv[0]} failed: {result.stderr}{result.stdout}"
    return result.stdout


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def image(workdir: Path) -> Path:
    path = workdir / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    return path


class Running:
    """A started daemon: its process, pidfile and NBD socket."""

    def __init__(self, proc: CliProcess, pidfile: Path, nbd_socket: Path | None) -> None:
        self.proc = proc
        self.pidfile = pidfile
        self.nbd_socket = nbd_socket

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.proc.send_signal(signum)
        return self.proc.finish(DEADLINE)


@pytest.fixture
def start_daemon(start_cli: StartCli, workdir: Path) -> Callable[..., Running]:
    """Start ``cowbackup daemon ARGS --pidfile P``, wait for the pidfile; start_cli kills it at teardown."""

    def start(*args: str, nbd_socket: Path | None = None) -> Running:
        pidfile = workdir / "daemon.pid"
        proc = start_cli("daemon", *args, "--pidfile", str(pidfile))
        wait_for(pidfile.exists, "pidfile", proc)
        wait_for(lambda: pidfile.read_text().endswith("\n"), "pid in the pidfile", proc)
        assert int(pidfile.read_text()) == proc.proc.pid
        return Running(proc, pidfile, nbd_socket)

    return start


def unix_server(path: Path) -> str:
    return f"addr.type=unix,addr.path={path}"


# ---------------------------------------------------------------------------------- the command line


def test_export_qemu_io_nbdinfo_sigterm(
    start_daemon: Callable[..., Running], workdir: Path, image: Path
) -> None:
    require("qemu-io", "nbdinfo")
    sock = workdir / "nbd.sock"
    daemon = start_daemon(
        "--blockdev",
        f"driver=file,node-name=disk0,filename={image}",
        "--nbd-server",
        unix_server(sock),
        "--export",
        "type=nbd,id=exp0,node-name=disk0,name=disk,writable=on,description=test disk",
        nbd_socket=sock,
    )
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    out = run_tool(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0xa5 64k 128k",
        "-c",
        "read -P 0xa5 64k 128k",
        daemon.uri("disk"),
    )
    assert "wrote 131072/131072" in out and "read 131072/131072" in out
    info = json.loads(run_tool("nbdinfo", "--json", daemon.uri("disk")))
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == 4 * MiB
    assert export["description"] == "test disk"
    assert export["is_read_only"] is False
    assert daemon.stop() == 0
    assert not daemon.pidfile.exists()
    assert not os.path.lexists(sock)
    data = image.read_bytes()
    assert data[64 * 1024 : 192 * 1024] == b"\xa5" * 128 * 1024
    assert data[: 64 * 1024] == bytes(64 * 1024)


def test_json_options_read_only_default_sigint(
    start_daemon: Callable[..., Running], workdir: Path, image: Path
) -> None:
    """Every option as JSON; the export name defaults to the node name and is read-only by default."""
    require("qemu-io", "nbdinfo")
    image.write_bytes(b"\x42" * 4 * MiB)
    sock = workdir / "nbd.sock"
    daemon = start_daemon(
        "--blockdev",
        json.dumps({"driver": "file", "node-name": "f", "filename": str(image)}),
        "--blockdev",
        json.dumps({"driver": "raw", "node-name": "r", "file": "f"}),
        "--nbd-server",
        json.dumps({"addr": {"type": "unix", "path": str(sock)}, "max-connections": 4}),
        "--export",
        json.dumps({"type": "nbd", "id": "e", "node-name": "r"}),
        nbd_socket=sock,
    )
    info = json.loads(run_tool("nbdinfo", "--json", daemon.uri("r")))
    assert info["exports"][0]["is_read_only"] is True
    out = run_tool("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 0 4M", daemon.uri("r"))
    assert "read 4194304/4194304" in out
    assert daemon.stop(signal.SIGINT) == 0
    assert not daemon.pidfile.exists()
    assert not os.path.lexists(sock)


def test_tcp_export(start_daemon: Callable[..., Running], image: Path) -> None:
    require("nbdinfo")
    port = free_tcp_port()
    daemon = start_daemon(
        "--blockdev=driver=file,node-name=d,filename=" + str(image),
        f"--nbd-server=addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
        "--export=nbd,id=e,node-name=d",
    )
    assert run_tool("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/d").strip() == str(4 * MiB)
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized option '--bogus'"),
        (["--blockdev"], "option '--blockdev' requires an argument"),
        (["extra"], "extra: Unexpected argument"),
        (["--blockdev", "driver=file,foo"], "--blockdev driver=file,foo: Expected '=' after parameter 'foo'"),
        (["--blockdev", "driver=file,=x"], "--blockdev driver=file,=x: Invalid parameter ''"),
        (["--blockdev", "a=1,a.b=2"], "--blockdev a=1,a.b=2: Parameters 'a.*' used inconsistently"),
        (["--blockdev", '{"driver":'], '--blockdev {"driver":: JSON parse error, '),
        (
            ["--blockdev", "driver=file,node-name=d,filename=IMG,bar=1"],
            "--blockdev driver=file,node-name=d,filename=IMG,bar=1: Parameter 'bar' is unexpected",
        ),
        (
            ["--blockdev", "driver=file,node-name=d,filename=IMG", "--export", "nbd,id=e,node-name=d"],
            "--export nbd,id=e,node-name=d: NBD server not running",
        ),
        (
            ["--nbd-server", "addr.type=unix,addr.path=S", "--export", "nbd,id=e,node-name=nope"],
            "--export nbd,id=e,node-name=nope: Cannot find device='' nor node-name='nope'",
        ),
        (
            [
                "--blockdev=driver=file,node-name=d,filename=IMG",
                "--nbd-server=addr.type=unix,addr.path=S",
                "--export=nbd,id=e,node-name=d",
                "--export=nbd,id=e,node-name=d,name=x",
            ],
            "--export nbd,id=e,node-name=d,name=x: Block export id 'e' is already in use",
        ),
        (
            [
                "--blockdev=driver=file,node-name=d,filename=IMG",
                "--nbd-server=addr.type=unix,addr.path=S",
                "--export=nbd,id=e,node-name=d",
                "--export=nbd,id=f,node-name=d",
            ],
            "--export nbd,id=f,node-name=d: NBD server already has export named 'd'",
        ),
        (["--export", "nbd,node-name=d"], "--export nbd,node-name=d: Parameter 'id' is missing"),
        (["--export", "foo,id=e"], "--export foo,id=e: Parameter 'type' does not accept value 'foo'"),
        (["--nbd-server", "addr.type=unix"], "--nbd-server addr.type=unix: Parameter 'addr.path' is missing"),
        (["--nbd-server", "addr.path=x"], "--nbd-server addr.path=x: Parameter 'addr.type' is missing"),
        (
            ["--nbd-server", "addr.type=bogus"],
            "--nbd-server addr.type=bogus: Parameter 'type' does not accept value 'bogus'",
        ),
        (
            ["--nbd-server", "addr.type=unix,addr.path=S,max-connections=-1"],
            "--nbd-server addr.type=unix,addr.path=S,max-connections=-1: "
            "Parameter 'max-connections' expects uint32_t",
        ),
        (
            ["--nbd-server", "addr.type=unix,addr.path=S", "--nbd-server", "addr.type=unix,addr.path=S2"],
            "--nbd-server addr.type=unix,addr.path=S2: NBD server already running",
        ),
        (["--monitor", "mon0"], '--monitor mon0: chardev "mon0" not found'),
        (["--chardev", "bogus,id=m"], "--chardev bogus,id=m: 'bogus' is not a valid char driver name"),
        (["--chardev", "socket,path=x"], "--chardev socket,path=x: chardev: no id specified"),
        (
            ["--chardev", "socket,id=m,path=M,server=on", "--monitor", "m,mode=readline"],
            "--monitor m,mode=readline: Only QMP is supported",
        ),
        (
            ["--pidfile", "/nonexistent/dir/p"],
            "cannot create PID file: Could not create '/nonexistent/dir/p': No such file or directory",
        ),
    ],
)
def test_bad_options(run_cli: RunCli, workdir: Path, image: Path, args: list[str], message: str) -> None:
    """Exit status 1 and exactly one line on stderr; nothing left behind (the sockets are removed)."""
    subst = {"IMG": str(image), "S": str(workdir / "s.sock"), "S2": str(workdir / "s2.sock")}
    subst["M"] = str(workdir / "m.sock")
    argv = []
    for arg in args:
        for key in ("S2", "IMG", "S", "M"):
            arg = arg.replace(f"={key}", f"={subst[key]}").replace(f"path={key}", f"path={subst[key]}")
        argv.append(arg)
    message = message.replace("IMG", str(image)).replace("addr.path=S2", f"addr.path={subst['S2']}")
    message = message.replace("addr.path=S,", f"addr.path={subst['S']},")
    result = run_cli("daemon", *argv, timeout=DEADLINE)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"cowbackup: {message}"), lines[0]
    assert result.stdout == ""
    assert not any(p.name.endswith(".sock") for p in workdir.iterdir())


def test_pidfile_locked(start_daemon: Callable[..., Running], run_cli: RunCli, workdir: Path) -> None:
    """A second daemon with the same pidfile is refused while the first runs."""
    daemon = start_daemon()
    result = run_cli("daemon", "--pidfile", str(daemon.pidfile), timeout=DEADLINE)
    assert result.returncode == 1
    assert "Cannot lock pid file" in result.stderr
    assert daemon.pidfile.exists()
    assert daemon.stop() == 0


# ---------------------------------------------------------------------------------- in process


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, DEADLINE)

    return asyncio.run(bounded())


def test_daemon_export_verbs(workdir: Path, image: Path) -> None:
    """The Daemon's NBD verbs, with our own NBD client holding a connection to the export."""
    sock = str(workdir / "nbd.sock")

    async def main() -> None:
        daemon = Daemon()
        events: list[Event] = []
        daemon.jobs.events.subscribe(events.append)
        try:
            await daemon.blockdev_add({"driver": "file", "node-name": "d", "filename": str(image)})
            with pytest.raises(BlockError, match=r"^NBD server not running$"):
                await daemon.nbd_server_stop()
            with pytest.raises(BlockError, match=r"^NBD server not running$"):
                await daemon.block_export_add({"type": "nbd", "id": "e", "node-name": "d"})
            await daemon.nbd_server_start({"type": "unix", "path": sock})
            with pytest.raises(BlockError, match=r"^NBD server already running$"):
                await daemon.nbd_server_start({"type": "unix", "path": sock + "2"})
            await daemon.block_export_add({"type": "nbd", "id": "e", "node-name": "d", "writable": True})
            with pytest.raises(BlockError, match=r"^Invalid block export id$"):
                await daemon.block_export_add({"type": "nbd", "id": "1x", "node-name": "d", "name": "y"})
            await daemon.block_export_add({"type": "nbd", "id": "e2", "node-name": "d", "name": "other"})
            assert daemon.query_block_exports() == [
                {"type": "nbd", "id": "e", "node-name": "d", "shutting-down": False},
                {"type": "nbd", "id": "e2", "node-name": "d", "shutting-down": False},
            ]
            client = await daemon.blockdev_add(
                {"driver": "nbd", "node-name": "c", "server": {"type": "unix", "path": sock}, "export": "d"}
            )
            await client.write(0, b"\x11" * 4096)
            with pytest.raises(BlockError, match=r"^export 'e' still in use$"):
                await daemon.block_export_del("e")
            await daemon.block_export_del("e", mode="hard")  # drops our client's connection
            assert events == [Event("BLOCK_EXPORT_DELETED", {"id": "e"})]
            with pytest.raises(BlockError, match=r"^Export 'e' is not found$"):
                await daemon.block_export_del("e")
            await daemon.blockdev_del("c")
            await daemon.nbd_server_stop()  # removes e2 too
            assert events[-1] == Event("BLOCK_EXPORT_DELETED", {"id": "e2"})
            assert daemon.query_block_exports() == []
            assert not os.path.lexists(sock)  # noqa: ASYNC240 - one lstat, in a test
            # The server can start again, and close() stops it.
            await daemon.nbd_server_start({"type": "unix", "path": sock}, max_connections=1)
            await daemon.block_export_add({"type": "nbd", "id": "e3", "node-name": "d"})
        finally:
            await daemon.close()
            await daemon.close()
        assert events[-1] == Event("BLOCK_EXPORT_DELETED", {"id": "e3"})
        assert daemon.nbd is None

    run(main())
    assert not os.path.lexists(sock)
    assert image.read_bytes()[:4096] == b"\x11" * 4096


def test_daemon_nbd_server_bad_addresses(workdir: Path) -> None:
    async def main() -> None:
        daemon = Daemon()
        try:
            cases: list[tuple[dict[str, Any], str]] = [
                (
                    {"type": "vsock", "cid": "3", "port": "1"},
                    "Parameter 'type' does not accept value 'vsock'",
                ),
                ({"type": "unix"}, "Parameter 'addr.path' is missing"),
                ({"type": "unix", "path": "/x", "abstract": True}, "Parameter 'addr.abstract' is unexpected"),
                ({"type": "inet", "host": "127.0.0.1"}, "Parameter 'addr.port' is missing"),
                ({"type": "unix", "path": str(workdir / "no" / "s")}, "Failed to bind socket to "),
            ]
            for addr, message in cases:
                with pytest.raises(BlockError) as info:
                    await daemon.nbd_server_start(addr)
                assert str(info.value).startswith(message)
                assert daemon.nbd is None
            with pytest.raises(BlockError, match="expects uint32_t"):
                await daemon.nbd_server_start(
                    {"type": "unix", "path": str(workdir / "s")}, max_connections=-1
                )
        finally:
            await daemon.close()

    run(main())


# ---------------------------------------------------------------------------------- QMP monitor


def _have_qmp_server() -> bool:
    return (
        importlib.util.find_spec("cowbackup.qmp.server") is not None
        and importlib.util.find_spec("qemu.qmp") is not None
    )


@pytest.fixture
def monitor_daemon(start_daemon: Callable[..., Running], workdir: Path, image: Path) -> Running:
    if not _have_qmp_server():
        pytest.skip("the QMP server (cowbackup.qmp.server) or qemu.qmp is not available")
    sock = workdir / "nbd.sock"
    qmp_sock = workdir / "qmp.sock"
    return start_daemon(
        "--blockdev",
        f"driver=file,node-name=d,filename={image}",
        "--nbd-server",
        unix_server(sock),
        "--export",
        "nbd,id=e,node-name=d",
        "--chardev",
        f"socket,id=mon0,path={qmp_sock},server=on,wait=off",
        "--monitor",
        "chardev=mon0",
        nbd_socket=sock,
    )


def test_monitor_qmp(monitor_daemon: Running, workdir: Path) -> None:
    from qemu.qmp import ExecuteError, QMPClient

    qmp_sock = workdir / "qmp.sock"
    assert stat.S_IMODE(os.lstat(qmp_sock).st_mode) == 0o600

    async def main() -> None:
        client = QMPClient("test")
        await client.connect(str(qmp_sock))
        try:
            exports: Any = await client.execute("query-block-exports")
            assert exports == [{"type": "nbd", "id": "e", "node-name": "d", "shutting-down": False}]
            with pytest.raises(ExecuteError, match="Block export id 'e' is already in use"):
                await client.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "d"})
            with pytest.raises(ExecuteError, match="Invalid parameter type for 'writable'"):
                await client.execute(
                    "block-export-add", {"type": "nbd", "id": "x", "node-name": "d", "writable": "on"}
                )
            with client.listener("BLOCK_EXPORT_DELETED") as events:
                await client.execute("block-export-del", {"id": "e"})
                event = await asyncio.wait_for(events.get(), DEADLINE)
            assert event["event"] == "BLOCK_EXPORT_DELETED"
            assert event["data"] == {"id": "e"}
            assert await client.execute("query-block-exports") == []
            await client.execute("nbd-server-stop")
            with pytest.raises(ExecuteError, match="NBD server not running"):
                await client.execute("nbd-server-stop")
            assert not os.path.lexists(workdir / "nbd.sock")  # noqa: ASYNC240 - one lstat, in a test
            with pytest.raises(
                ExecuteError, match=r"^Invalid parameter type for 'addr\.port', expected: string$"
            ):
                await client.execute(
                    "nbd-server-start", {"addr": {"type": "inet", "host": "127.0.0.1", "port": 10809}}
                )
            addr = {"type": "unix", "path": str(workdir / "nbd2.sock")}
            await client.execute("nbd-server-start", {"addr": addr, "max-connections": 2})
            await client.execute(
                "block-export-add", {"type": "nbd", "id": "e2", "node-name": "d", "name": "x"}
            )
            exports = await client.execute("query-block-exports")
            assert [e["id"] for e in exports] == ["e2"]
            await client.execute("quit")
        finally:
            # After "quit" the daemon hangs up, as QEMU does: the client reports that EOF here.
            with contextlib.suppress(EOFError, ConnectionError):
                await client.disconnect()

    run(main())
    assert monitor_daemon.proc.finish(DEADLINE) == 0
    assert not monitor_daemon.pidfile.exists()
    assert not os.path.lexists(qmp_sock)
    assert not os.path.lexists(workdir / "nbd2.sock")
