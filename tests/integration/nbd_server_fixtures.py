"""Helpers for the NBD server integration tests (``test_nbd_server_tools``, ``test_nbd_server_robustness``).

* :func:`serve`: ``cowbackup serve IMAGE --socket PATH`` as a subprocess; waits for the URI line with a
  deadline, stops it with SIGINT at the end (exit 0 and no traceback on stderr, or the test fails) and
  kills it if anything went wrong.
* :func:`in_process_server`: an :class:`~cowbackup.nbd.listener.NBDServer` in the test's own event loop
  (``asyncio.run`` inside the test), for several exports, a small handshake timeout, a connection cap,
  and for looking at the server's state.
* :func:`run_tool` / :func:`arun_tool`: run a real peer (qemu-io, qemu-img, nbdinfo, nbdcopy, openssl,
  the nbdsh scripts) with a timeout; the async one kills the peer if the test ends first.
* :func:`nbdsh_script`: the command line for a script of ``nbdsh_scripts/``, run by Debian's
  ``/usr/bin/python3`` (where ``import nbd`` is libnbd), never by the venv's interpreter.
* :class:`RawClient`: a minimal hand-written NBD client over asyncio streams, for what no real client
  does on purpose: garbage, half handshakes, payloads cut off, requests left unanswered.
* :func:`make_tls_creds`: a CA, a server and a client certificate made with the ``openssl`` CLI, laid
  out like QEMU's ``tls-creds-x509`` directory (which is also what libnbd's ``tls-certificates`` reads).
* :func:`file_extents`, :func:`qemu_map`, :func:`nbdinfo_map`: allocation maps to compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cowbackup.daemon import Daemon
from cowbackup.nbd.constants import (
    IHAVEOPT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_OPT_EXPORT_NAME,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBDMAGIC,
)
from cowbackup.nbd.listener import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, NBDServer
from cowbackup.nbd.tls import server_context
from cowbackup.nbd.uri import NBDAddress

from .conftest import CliProcess

#: Longest a peer (qemu-io, nbdcopy...) may run in these tests before it counts as hung.
TOOL_TIMEOUT = 30.0
#: Longest ``cowbackup serve`` may take to print its URI, or to exit after SIGINT.
SERVE_TIMEOUT = 15.0
#: Longest the server may take to notice a client went away (or to drop a stalled one).
SERVER_REACTION_TIMEOUT = 5.0

SCRIPTS = Path(__file__).resolve().parent / "nbdsh_scripts"
#: Debian's interpreter, the one that has python3-libnbd (``import nbd``).
SYSTEM_PYTHON = "/usr/bin/python3"

_serial = itertools.count()


# ---------------------------------------------------------------------------------------------- peers


def require_tools(*names: str) -> None:
    """Skip the test unless every program in ``names`` is installed."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def require_libnbd_python() -> None:
    """Skip the test unless ``/usr/bin/python3`` can ``import nbd`` (Debian's python3-libnbd)."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} is not installed")
    proc = run_tool(SYSTEM_PYTHON, "-c", "import nbd", env=system_python_env())
    if proc.returncode != 0:
        pytest.skip("python3-libnbd is not installed for /usr/bin/python3")


def run_tool(
    *argv: str, timeout: float = TOOL_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a peer to completion (killed and failing the test after ``timeout``); output as text."""
    try:
        return subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout} s")


def check_tool(*argv: str, timeout: float = TOOL_TIMEOUT, env: dict[str, str] | None = None) -> str:
    """Run a peer that must succeed; return its stdout."""
    proc = run_tool(*argv, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


async def arun_tool(
    *argv: str, limit: float = TOOL_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """:func:`run_tool` for tests that run an event loop (an in-process server must keep serving).

    The peer is killed if it outlives ``limit`` seconds or the test stops waiting for it.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        try:
            out, err = await asyncio.wait_for(proc.communicate(), limit)
        except TimeoutError:
            pytest.fail(f"{' '.join(argv)} did not finish within {limit} s")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(), err.decode())


async def acheck_tool(*argv: str, limit: float = TOOL_TIMEOUT, env: dict[str, str] | None = None) -> str:
    proc = await arun_tool(*argv, limit=limit, env=env)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def system_python_env() -> dict[str, str]:
    """The environment for ``/usr/bin/python3``: ``/usr/bin`` first in PATH, nothing of the venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in ("/usr/bin", env.get("PATH", "")) if p)
    return env


def nbdsh_script(name: str, *args: str) -> list[str]:
    """The command line running ``nbdsh_scripts/NAME`` with Debian's interpreter."""
    return [SYSTEM_PYTHON, str(SCRIPTS / name), *args]


def script_result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON object a script of ``nbdsh_scripts/`` prints as its last stdout line."""
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{proc.args} printed nothing:\n{proc.stderr}"
    result = json.loads(lines[-1])
    assert isinstance(result, dict), lines[-1]
    return result


# ---------------------------------------------------------------------------------------------- servers


@dataclass
class ServedImage:
    """A running ``cowbackup serve``: its URI, Unix socket (None on TCP) and process."""

    uri: str
    unix_socket: Path | None
    cli: CliProcess

    @property
    def socket(self) -> Path:
        """The Unix socket (the test failing if the server listens on TCP)."""
        assert self.unix_socket is not None, f"{self.uri} is not on a Unix socket"
        return self.unix_socket

    @property
    def pid(self) -> int:
        return self.cli.proc.pid

    def stop(self, sig: int = signal.SIGINT, timeout: float = SERVE_TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit (failing the test after ``timeout``); the exit code."""
        if self.cli.proc.poll() is None:
            self.cli.proc.send_signal(sig)
        return self.cli.finish(timeout)

    def running(self) -> bool:
        return self.cli.proc.poll() is None


@contextlib.contextmanager
def serve(image: Path, workdir: Path, *options: str, bind: str | None = None) -> Iterator[ServedImage]:
    """``cowbackup serve IMAGE --socket PATH OPTIONS`` (``--bind BIND`` instead if given) for the block.

    Leaving the block normally stops the server with SIGINT and checks it exits 0 without a traceback
    (an unexpected exception in the server fails the test that provoked it); the process is killed in
    any case.
    """
    n = next(_serial)
    socket = None if bind else workdir / f"nbd-{n}.sock"
    where = ["--bind", bind] if bind else ["--socket", str(socket)]
    cli = CliProcess(["serve", str(image), *where, *options], workdir, workdir / f"serve-{n}.stderr")
    try:
        uri = cli.wait_line(lambda line: line.startswith("nbd"), timeout=SERVE_TIMEOUT)
        assert socket is None or socket.is_socket(), f"{socket} is not a socket once the URI is printed"
        served = ServedImage(uri, socket, cli)
        yield served
        if served.running():
            code = served.stop()
            assert code == 0, f"cowbackup serve exited {code}: {cli.stderr()}"
        assert "Traceback" not in cli.stderr(), cli.stderr()
    finally:
        cli.close()


@dataclass(frozen=True)
class ExportSpec:
    """One export of an in-process server: a raw image file served under ``name``."""

    name: str
    image: Path
    writable: bool = True


@dataclass
class InProcess:
    """A running in-process server (see :func:`in_process_server`)."""

    server: NBDServer
    socket: Path

    def uri(self, export: str = "", tls_certificates: Path | None = None) -> str:
        address = NBDAddress(
            export=export,
            socket=str(self.socket),
            tls=tls_certificates is not None,
            tls_certificates=str(tls_certificates) if tls_certificates else None,
        )
        return address.to_uri()

    async def wait_connections(self, count: int, limit: float = SERVER_REACTION_TIMEOUT) -> None:
        """Wait (at most ``limit`` seconds) until the server has exactly ``count`` connections open."""
        await wait_until(lambda: self.server.connection_count == count, limit, f"{count} connections")


@contextlib.asynccontextmanager
async def in_process_server(
    socket: Path,
    exports: Sequence[ExportSpec],
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    tls_creds: Path | None = None,
) -> AsyncIterator[InProcess]:
    """An NBDServer in the running event loop, serving ``exports`` on ``socket``; closed at the end.

    ``tls_creds``: a directory of :func:`make_tls_creds`; TLS is then required.
    """
    daemon = Daemon()
    server = NBDServer(
        daemon.graph,
        tls_creds=server_context(str(tls_creds)) if tls_creds else None,
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
    )
    try:
        for i, spec in enumerate(exports):
            await daemon.blockdev_add(
                {
                    "driver": "raw",
                    "node-name": f"disk{i}",
                    "read-only": not spec.writable,
                    "file": {"driver": "file", "filename": str(spec.image)},
                }
            )
            server.add_export(spec.name, f"disk{i}", writable=spec.writable)
        await server.listen_unix(str(socket))
        yield InProcess(server, socket)
    finally:
        await server.close()
        await daemon.close()


async def wait_until(predicate: Callable[[], bool], limit: float, what: str) -> None:
    """Poll ``predicate`` in the event loop until it holds; fail the test after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------- raw client

GREETING = struct.Struct(">QQH")
EXPORT_INFO = struct.Struct(">QH")  # NBD_OPT_EXPORT_NAME's answer with NBD_FLAG_C_NO_ZEROES
OPTION = struct.Struct(">QII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")


class _ReaderKeepingReceived(asyncio.StreamReader):
    """A StreamReader that, when the connection breaks, still hands out what it received, then EOF.

    asyncio's own raises the transport's error as soon as it is set, discarding the bytes it holds: when
    the server closes while the client is still writing (its next write fails with EPIPE, or the read
    with ECONNRESET, as the server leaves unread requests behind), the replies the server sent just
    before the close would be lost although they arrived.  A blocking socket reads them first, too.
    """

    def set_exception(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionError):
            self.feed_eof()
        else:
            super().set_exception(exc)


class RawClient:
    """A hand-written NBD client: exactly the bytes a test wants on the wire, nothing more.

    Only the oldest transmission mode (NBD_OPT_EXPORT_NAME, simple replies) is spoken, so every reply
    is a 16-byte header plus, for a successful READ, the data.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.size = 0

    @classmethod
    async def connect(cls, socket: Path) -> RawClient:
        """Connect to ``socket``.  Every byte the server sent can be read, even after the connection
        broke (see :class:`_ReaderKeepingReceived`); a write to a broken connection still fails."""
        loop = asyncio.get_running_loop()
        reader = _ReaderKeepingReceived(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await asyncio.wait_for(
            loop.create_unix_connection(lambda: protocol, str(socket)), SERVER_REACTION_TIMEOUT
        )
        return cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def read_greeting(self) -> None:
        data = await asyncio.wait_for(self.reader.readexactly(GREETING.size), SERVER_REACTION_TIMEOUT)
        magic, ihaveopt, _flags = GREETING.unpack(data)
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT), data

    async def handshake(self, export: str = "") -> int:
        """Greeting, client flags, NBD_OPT_EXPORT_NAME: the connection is in transmission; the size."""
        await self.read_greeting()
        name = export.encode()
        self.writer.write(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
        self.writer.write(OPTION.pack(IHAVEOPT, NBD_OPT_EXPORT_NAME, len(name)) + name)
        await self.writer.drain()
        data = await asyncio.wait_for(self.reader.readexactly(EXPORT_INFO.size), SERVER_REACTION_TIMEOUT)
        self.size, _flags = EXPORT_INFO.unpack(data)
        return self.size

    def request(self, cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> None:
        """Queue a request header (a WRITE's payload is written separately, maybe only in part)."""
        self.writer.write(REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length))

    async def reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """The next simple reply: (error, cookie, data); ``data_length`` bytes follow a good READ reply."""
        header = await asyncio.wait_for(self.reader.readexactly(SIMPLE_REPLY.size), SERVER_REACTION_TIMEOUT)
        magic, error, cookie = SIMPLE_REPLY.unpack(header)
        assert magic == NBD_SIMPLE_REPLY_MAGIC, header
        data = b""
        if data_length and not error:
            data = await asyncio.wait_for(self.reader.readexactly(data_length), SERVER_REACTION_TIMEOUT)
        return error, cookie, data

    async def wait_closed_by_server(self, limit: float = SERVER_REACTION_TIMEOUT) -> bytes:
        """Read until the server closes the connection (failing the test after ``limit`` s); all read."""
        received = bytearray()
        try:
            async with asyncio.timeout(limit):
                while chunk := await self.reader.read(65536):
                    received += chunk
        except TimeoutError:
            pytest.fail(f"the server kept the connection open for {limit} s")
        except ConnectionResetError:
            pass  # the server closed with our unread garbage in its buffer: as good as EOF
        return bytes(received)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# ---------------------------------------------------------------------------------------------- TLS


def make_tls_creds(directory: Path) -> Path:
    """CA, server and client certificates (RSA 2048, PEM, unencrypted keys) in QEMU's x509 layout.

    Both certificates are for ``localhost`` (QEMU insists on a host name to check even over a Unix
    socket: pass ``tls-hostname=localhost``).
    """
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        check_tool("openssl", *args)

    ca_key, ca_cert = directory / "ca-key.pem", directory / "ca-cert.pem"
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(ca_key), "-out", str(ca_cert), "-subj", "/CN=cowbackup test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for who, purpose in (("server", "serverAuth"), ("client", "clientAuth")):
        key, csr, cert = (directory / f"{who}-{part}.pem" for part in ("key", "csr", "cert"))
        ext = directory / f"{who}.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={purpose}\n"
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        )
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN=localhost/O=cowbackup test {who}",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext),
        )  # fmt: skip
    return directory


# ---------------------------------------------------------------------------------------------- maps

Extent = tuple[int, int, bool]  # (start, end, is data)


def file_extents(path: Path) -> list[Extent]:
    """The file's data and holes, by ``SEEK_DATA``/``SEEK_HOLE`` (exact on tmpfs)."""
    size = os.path.getsize(path)
    extents: list[Extent] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
                data = size
            if data > pos:
                extents.append((pos, data, False))
            if data >= size:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            extents.append((data, hole, True))
            pos = hole
    finally:
        os.close(fd)
    return extents


def merge_extents(extents: Sequence[Extent]) -> list[Extent]:
    """Adjacent extents of the same kind joined."""
    merged: list[Extent] = []
    for start, end, data in extents:
        if merged and merged[-1][2] == data and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end, data)
        elif end > start:
            merged.append((start, end, data))
    return merged


def qemu_map(target: str) -> list[dict[str, Any]]:
    """``qemu-img map --output=json -f raw TARGET``, adjacent equal entries merged, ``offset`` dropped.

    ``offset`` (where the bytes live in the protocol layer) is the only field that legitimately differs
    between a file and the same file seen through NBD.
    """
    entries: list[dict[str, Any]] = json.loads(
        check_tool("qemu-img", "map", "--output=json", "-f", "raw", target)
    )
    merged: list[dict[str, Any]] = []
    for entry in entries:
        entry = {k: v for k, v in entry.items() if k != "offset"}
        if merged:
            last = merged[-1]
            same = {k: v for k, v in last.items() if k not in ("start", "length")} == {
                k: v for k, v in entry.items() if k not in ("start", "length")
            }
            if same and last["start"] + last["length"] == entry["start"]:
                last["length"] += entry["length"]
                continue
        merged.append(entry)
    return merged


def nbdinfo_map(uri: str) -> list[Extent]:
    """``nbdinfo --map --json URI`` (base:allocation) as merged extents; type 0 is data, 3 a hole."""
    entries: list[dict[str, Any]] = json.loads(check_tool("nbdinfo", "--map", "--json", uri))
    extents: list[Extent] = []
    for e in entries:
        assert e["type"] in (0, 3), f"unexpected base:allocation type in {e}"
        extents.append((e["offset"], e["offset"] + e["length"], e["type"] == 0))
    return merge_extents(extents)
