"""A real S3 server for the tests: a one-node Ceph cluster with its RADOS Gateway.

* ``ceph`` (session): ``tools/ceph-one-node start`` in a fresh directory on free ports, stopped (and
  the directory removed) when the session ends.  Its :class:`Ceph` knows the endpoint and the test
  user's keys, and makes buckets.
* ``s3_env`` (per test): the AWS environment variables of the test user set in ``os.environ`` (so the
  store under test and every ``cowbackup`` the test runs see them), with no ``~/.aws`` files.
* ``fault_proxy`` (per test): a :class:`~.s3_proxy.FaultProxy` in front of radosgw.
* :meth:`Ceph.kill_gateway` / :meth:`Ceph.start_gateway`: radosgw killed with SIGKILL, and started again
  on the same port with the same data (``tools/ceph-one-node start-rgw``).

The cluster's start takes about 2 s here (see tools/ceph-one-node); its data lives in the OSD's RAM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from .s3_proxy import FaultProxy

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

    def kill_gateway(self) -> None:
        """SIGKILL radosgw (the monitor and OSD go on); wait until it is gone."""
        pid = int((self.dir / "run" / "client.rgw.a.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + CEPH_TIMEOUT
        while os.path.exists(f"/proc/{pid}") and "State:\tZ" not in _proc_status(pid):
            assert time.monotonic() < deadline, "radosgw did not die"
            time.sleep(0.02)  # waiting for the kill to take effect, with a deadline

    def start_gateway(self) -> None:
        """Start radosgw again on its port; returns once it answers."""
        started = _tool("start-rgw", str(self.dir))
        assert started.returncode == 0, started.stderr

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", ())]


def _proc_status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "State:\tZ"


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


@pytest.fixture
def fault_proxy(ceph: Ceph) -> Iterator[FaultProxy]:
    proxy = FaultProxy(int(ceph.endpoint.rsplit(":", 1)[1]))
    try:
        yield proxy
    finally:
        with contextlib.suppress(OSError):
            proxy.close()
