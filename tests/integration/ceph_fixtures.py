"""A real S3 server for the tests: a one-node Ceph cluster with its RADOS Gateway.

* ``ceph`` (session): ``tools/ceph-one-node start`` in a fresh directory on free ports, stopped (and
  the directory removed) when the session ends.  Its :class:`Ceph` knows the endpoint and the test
  user's keys, and makes buckets.
* ``s3_env`` (per test): the AWS environment variables of the test user set in ``os.environ`` (so the
  store under test and every ``cowbackup`` the test runs see them), with no ``~/.aws`` files.
* :class:`FaultProxy`: an HTTP proxy in front of radosgw that cuts off response bodies of the keys it
  is told to (a store returning truncated bodies), and logs every request (to count what a command
  costs); everything else passes through unchanged.

The cluster's start takes about 2 s here (see tools/ceph-one-node); its data lives in the OSD's RAM.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

TOOL = Path(__file__).resolve().parents[2] / "tools" / "ceph-one-node"
#: Longest the cluster may take to start or stop before the session fails.
CEPH_TIMEOUT = 120.0


def _free_port(pair: bool = False) -> int:
    """A port free on 127.0.0.1 now (and the next one too if ``pair``); the tool refuses taken ones."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair or port >= 65535:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports")


@dataclass(frozen=True)
class Ceph:
    dir: Path
    endpoint: str
    env: dict[str, str]

    def client(self) -> Any:
        """A boto3 client of the test user (path-style, as the store uses)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self, stem: str = "t") -> str:
        name = f"{stem}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", ())]


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOOL), *args], capture_output=True, text=True, timeout=CEPH_TIMEOUT, check=False
    )


@pytest.fixture(scope="session")
def ceph() -> Iterator[Ceph]:
    # A short path: admin sockets live under it, and a unix socket path has at most 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="cowbackup-ceph-", dir="/tmp"))
    try:
        started = _tool(
            "start", str(d), "--port", str(_free_port()), "--mon-port", str(_free_port(pair=True)),
            "--memory", "4G",
        )  # fmt: skip
        if started.returncode != 0:
            pytest.fail(f"ceph-one-node start failed: {started.stderr}")
        env_out = _tool("env", str(d))
        assert env_out.returncode == 0, env_out.stderr
        env = dict(line.removeprefix("export ").split("=", 1) for line in env_out.stdout.splitlines())
        yield Ceph(d, env["AWS_ENDPOINT_URL"], env)
    finally:
        stopped = _tool("stop", str(d))
        shutil.rmtree(d, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr


@pytest.fixture
def s3_env(ceph: Ceph, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The test user's credentials and the endpoint in the environment; no ~/.aws of the developer's."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in ceph.env.items():
        monkeypatch.setenv(name, value)
    return ceph.env


class FaultProxy:
    """An HTTP/1.1 proxy to radosgw on 127.0.0.1 that logs every request and cuts off the body of GETs
    whose path contains a word of ``truncate`` (``budget`` times, then it lets them through; -1: always).

    Requests are forwarded with their own Host header, so that S3 signatures still match.
    """

    def __init__(self, upstream_port: int) -> None:
        self.truncate: set[str] = set()
        self.budget = -1
        self.cut = 0
        #: (method, path) of every request, in order of arrival.
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        upstream.putheader(k, v)
                    upstream.endheaders(body)
                    reply = upstream.getresponse()
                    data = reply.read()
                finally:
                    upstream.close()
                self.send_response(reply.status, reply.reason)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if self.command == "GET" and data and proxy._should_cut(self.path):
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def _should_cut(self, path: str) -> bool:
        with self._lock:
            if not any(word in path for word in self.truncate) or self.budget == 0:
                return False
            self.budget -= 1 if self.budget > 0 else 0
            self.cut += 1
            return True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def fault_proxy(ceph: Ceph) -> Iterator[FaultProxy]:
    proxy = FaultProxy(int(ceph.endpoint.rsplit(":", 1)[1]))
    try:
        yield proxy
    finally:
        with contextlib.suppress(OSError):
            proxy.close()
