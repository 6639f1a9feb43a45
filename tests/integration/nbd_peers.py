"""Real NBD peers for the integration tests: ``qemu-nbd`` and ``nbdkit``, started by socket activation.

The test creates the Unix socket, listens on it and hands it to the server as fd 3 (systemd's
``LISTEN_FDS`` protocol, which both servers speak; libnbd starts its servers the same way)::

    test:    socket() bind() listen()  --fd 3-->  python -c 'dup2, LISTEN_PID=getpid(), exec qemu-nbd ...'
    client:  connect() succeeds at once (the kernel queues it); the server accepts when it is up

So there is nothing to wait for and no race: a connection made before the server runs waits in the
backlog, and a server that dies at start-up closes the last listening fd, which fails queued and later
connects at once (ECONNREFUSED / reset) instead of hanging them.  This also works for a qemu-nbd without
``--persistent``, which a readiness probe would use up.

Every peer is stopped when its ``with`` block ends, even when the test fails: SIGTERM, then SIGKILL after
a deadline.  Waiting for a condition (a line in a log) polls with a deadline, never a bare sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from cowbackup.nbd.uri import NBDAddress

#: How long a peer gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0


def require(*tools: str) -> None:
    """Skip the test unless every tool is on PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


class Peer:
    """A server process listening on ``socket_path`` (or on 127.0.0.1:``port``); output in ``log_path``."""

    def __init__(
        self, name: str, proc: subprocess.Popen[bytes], socket_path: Path, log_path: Path, port: int | None
    ) -> None:
        self.name = name
        self.proc = proc
        self.socket_path = socket_path
        self.log_path = log_path
        self.port = port

    def uri(self, export: str = "") -> str:
        return self.address(export).to_uri()

    def address(self, export: str = "") -> NBDAddress:
        if self.port is not None:
            return NBDAddress(export=export, host="127.0.0.1", port=self.port)
        return NBDAddress(export=export, socket=str(self.socket_path))

    def server_options(self) -> dict[str, str]:
        """The nbd driver's ``server`` option for this peer (QEMU sends the port as a string)."""
        if self.port is not None:
            return {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}
        return {"type": "unix", "path": str(self.socket_path)}

    def stderr(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_exit(self, timeout: float) -> int:
        """The exit status, once the process ends; fails the test after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout} s")

    def kill(self) -> None:
        """SIGKILL now (a server crash) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`.  Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)


#: Runs in the child: move the listening socket to fd 3, set LISTEN_PID to our pid (exec keeps it), exec.
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execvp(sys.argv[2], sys.argv[2:])
"""


@contextlib.contextmanager
def start_peer(name: str, argv: Sequence[str], workdir: Path, *, tcp: bool = False) -> Iterator[Peer]:
    """Run ``argv`` on a socket-activated Unix socket in ``workdir`` (or a TCP port on 127.0.0.1 that the
    kernel picks, known before the server starts); stop it on exit."""
    socket_path = workdir / f"{name}.sock"
    log_path = workdir / f"{name}.log"
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    listener = socket.socket(socket.AF_INET if tcp else socket.AF_UNIX, socket.SOCK_STREAM)
    port: int | None = None
    try:
        if tcp:
            listener.bind(("127.0.0.1", 0))
            port = listener.getsockname()[1]
        else:
            listener.bind(str(socket_path))
        listener.listen(64)
        fd = listener.fileno()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", _ACTIVATE, str(fd), *argv],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
    finally:
        listener.close()  # the server holds the only listening fd from now on
    peer = Peer(name, proc, socket_path, log_path, port)
    try:
        yield peer
    except BaseException as err:
        peer.stop()
        err.add_note(f"--- {name} exit status {proc.returncode}, output:\n{peer.stderr()}")
        raise
    finally:
        peer.stop()


def qemu_nbd(
    workdir: Path,
    image: Path,
    *,
    name: str = "qemu-nbd",
    persistent: bool = True,
    read_only: bool = False,
    export: str | None = None,
    tls_dir: Path | None = None,
    tcp: bool = False,
    extra: Sequence[str] = (),
) -> contextlib.AbstractContextManager[Peer]:
    """``qemu-nbd -f raw`` serving ``image`` (``--discard=unmap``, so TRIM punches holes)."""
    argv = ["qemu-nbd", "-f", "raw", "--discard=unmap"]
    if persistent:
        argv.append("--persistent")
    if read_only:
        argv.append("--read-only")
    if export is not None:
        argv += ["--export-name", export]
    if tls_dir is not None:
        argv += ["--object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server", "--tls-creds", "tls0"]
    argv += [*extra, str(image)]
    return start_peer(name, argv, workdir, tcp=tcp)


def nbdkit(
    workdir: Path,
    plugin: str,
    *params: str,
    name: str = "nbdkit",
    filters: Sequence[str] = (),
) -> contextlib.AbstractContextManager[Peer]:
    """``nbdkit -f [--filter=F ...] PLUGIN PARAMS`` (exits with the test process too)."""
    argv = ["nbdkit", "-f", "--exit-with-parent", *(f"--filter={f}" for f in filters), plugin, *params]
    return start_peer(name, argv, workdir)


# ---------------------------------------------------------------------------------------------- waiting


async def wait_until(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Poll ``predicate`` (from a coroutine) until it holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


_LOG_START = re.compile(r"connection=\d+ (\w+) id=(\d+) ")
_LOG_END = re.compile(r"connection=\d+ \.\.\.(\w+) id=(\d+) ")


def nbdkit_log_requests(log_path: Path, command: str = "Read") -> tuple[int, int]:
    """From an nbdkit ``--filter=log`` file: (requests of ``command`` started, most in flight at once).

    The log filter writes ``Read id=N ...`` when a request enters and ``...Read id=N return=...`` when it
    leaves, in order; counting the open ones over the file gives the server's view of concurrency.
    """
    started = 0
    open_now = 0
    most = 0
    try:
        lines = log_path.read_text().splitlines()
    except FileNotFoundError:
        return 0, 0
    for line in lines:
        if (m := _LOG_END.search(line)) and m.group(1) == command:
            open_now -= 1
        elif (m := _LOG_START.search(line)) and m.group(1) == command:
            started += 1
            open_now += 1
            most = max(most, open_now)
    return started, most


# ---------------------------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr}")


def make_tls_creds(directory: Path) -> Path:
    """A CA and a server and a client certificate, laid out as QEMU's ``tls-creds-x509`` directory.

    ``directory/ca-cert.pem``, ``server-cert.pem``/``server-key.pem`` (for qemu-nbd) and
    ``client-cert.pem``/``client-key.pem`` (for our client; qemu-nbd verifies clients by default).
    RSA 2048 keys without a passphrase, in PEM, which qemu's GnuTLS reads.  The CA key lives in a
    sibling directory so the credentials directory holds only what the peers need.
    """
    require("openssl")
    ca_dir = directory.parent / f"{directory.name}-ca"
    directory.mkdir(parents=True, exist_ok=True)
    ca_dir.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=cowbackup test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(ca_dir / "ca-key.pem"), "-out", str(directory / "ca-cert.pem"),
        cwd=ca_dir,
    )  # fmt: skip
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = ca_dir / f"{role}.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n"
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=localhost/O=cowbackup {role}",
            "-keyout", str(directory / f"{role}-key.pem"), "-out", str(ca_dir / f"{role}.csr"),
            cwd=ca_dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(ca_dir / f"{role}.csr"), "-days", "2",
            "-CA", str(directory / "ca-cert.pem"), "-CAkey", str(ca_dir / "ca-key.pem"),
            "-CAcreateserial", "-extfile", str(ext), "-out", str(directory / f"{role}-cert.pem"),
            cwd=ca_dir,
        )  # fmt: skip
    return directory
