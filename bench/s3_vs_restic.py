"""Backups to S3: cowbackup against restic's ``s3:`` backend, both on the same Ceph RADOS Gateway.

Run: .venv/bin/python bench/s3_vs_restic.py [--size 1G] [--workdir /dev/shm] [--json]

The disk is the repository benchmark's (``repo_vs_peers.py``: files from /usr, random data, written zeros,
holes in fragmented runs).  A one-node Ceph cluster (``tools/ceph-one-node``, data in the OSD's RAM) is
started for the run and stopped at its end.  Each tool gets a fresh copy of the image and a fresh
encrypted repository in its own bucket::

    full backup      timed (whole process)
    rewrite 1%       64 KiB pieces of random data (the same offsets and bytes for both tools)
    second backup    timed; reads the whole image again
    restore          the second snapshot, timed, then compared with the image (a difference fails)

cowbackup's requests come from its ``backup --json`` report (every HTTP request, as billed).  cowbackup
also backs the image up into a local directory on the same tmpfs, for the S3-versus-local goal.  Goals
(issue 14): full backup >= 3x restic's throughput, restore >= 2x, requests per GiB of new data <= 1.1 x
(1 GiB / chunk size), cowbackup's full backup to S3 >= 0.7x its backup to a local directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from cowbackup.cli.argtypes import size
from daemon_vs_qsd import BenchError, _progress, copy_extents
from repo_vs_peers import (
    MIX,
    Cowbackup,
    Measured,
    Restic,
    Runner,
    SystemFiles,
    _json_result,
    make_image,
    rewrite,
    same_bytes,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1000 * 1000
TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "ceph-one-node")
DEFAULT_CHUNK = 4 * MiB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ceph_cluster(memory: int) -> Iterator[dict[str, str]]:
    """A one-node Ceph with radosgw for the run; the AWS environment of its test user."""
    d = tempfile.mkdtemp(prefix="cowbackup-bench-ceph-", dir="/tmp")
    try:
        mon = _free_port()
        while mon + 1 > 65535:
            mon = _free_port()
        argv = [
            TOOL,
            "start",
            d,
            "--port",
            str(_free_port()),
            "--mon-port",
            str(mon),
            "--memory",
            str(memory),
        ]
        started = subprocess.run(argv, capture_output=True, text=True, check=False)
        if started.returncode != 0:
            raise BenchError(f"ceph-one-node start: {started.stderr}")
        out = subprocess.run([TOOL, "env", d], capture_output=True, text=True, check=True).stdout
        yield dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    finally:
        subprocess.run([TOOL, "stop", d], capture_output=True, check=False)
        shutil.rmtree(d, ignore_errors=True)


def new_bucket(env: dict[str, str], stem: str) -> str:
    import boto3  # only needed here; the tools import it themselves

    name = f"{stem}-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=name)
    return name


class CowbackupS3(Cowbackup):
    """cowbackup with its repository in a bucket; keeps each backup's --json result."""

    def __init__(self, runner: Runner, workdir: str, env: dict[str, str], location: str | None) -> None:
        super().__init__(runner, workdir)
        self.env.update(env)
        if location is not None:
            self.repo = location
        self.results: list[dict[str, Any]] = []

    def backup(self, image: str) -> Measured:
        argv = [*self.cli, "backup", image, "--repo", self.repo, "--name", "bench/vm1/disk0", "--json"]
        m = self.runner.run(argv, self.env)
        result = _json_result(m.stdout, "cowbackup backup")
        self.results.append(result)
        self.snapshots.append(result["snapshot"])
        return m


class ResticS3(Restic):
    def __init__(self, runner: Runner, workdir: str, env: dict[str, str], location: str) -> None:
        super().__init__(runner, workdir)
        self.env.update(env)
        self.repo = location


def one_tool(tool: Any, base: str, image_size: int, seed: int, workdir: str) -> dict[str, Any]:
    image = os.path.join(workdir, f"{tool.name}-disk.raw")
    outdir = os.path.join(workdir, f"{tool.name}-restore")
    os.makedirs(outdir)
    try:
        copy_extents(base, image)
        tool.init()
        full = tool.backup(image)
        rewrite(image, image_size, seed)
        second = tool.backup(image)
        restore, restored = tool.restore(image, outdir)
        if not same_bytes(image, restored):
            raise BenchError(f"{tool.name}: WRONG RESTORE, {restored} differs from {image}")
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
    out = {"full_s": full.seconds, "second_s": second.seconds, "restore_s": restore.seconds}
    _progress(
        f"{tool.name:<9} full {full.seconds:6.2f} s ({image_size / full.seconds / MB:5.0f} MB/s)  "
        f"second {second.seconds:6.2f} s  restore {restore.seconds:6.2f} s  ok"
    )
    return out


def local_full(runner: Runner, base: str, workdir: str) -> float:
    tool = CowbackupS3(runner, os.path.join(workdir, "local"), {}, None)
    os.makedirs(tool.workdir)
    image = os.path.join(workdir, "local-disk.raw")
    try:
        copy_extents(base, image)
        tool.init()
        seconds = tool.backup(image).seconds
    finally:
        tool.clean()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
    _progress(f"cowbackup to a local directory: full {seconds:6.2f} s")
    return seconds


def requests_per_new_gib(result: dict[str, Any], chunk_size: int) -> tuple[float, int]:
    """(requests of the backup per GiB of new chunk data, total requests)."""
    requests = sum(v for k, v in result["requests"].items() if k != "retries")
    new_bytes = result["stats"]["new_chunks"] * chunk_size
    return requests / (new_bytes / GiB) if new_bytes else float("inf"), requests


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=size, default=1 * GiB, help="the disk image's size (1G)")
    p.add_argument("--workdir", default="/dev/shm", help="where the images and local repository go")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="cowbackup-s3-bench-", dir=args.workdir)
    use_time = os.path.exists("/usr/bin/time")
    runner = Runner(workdir, use_time)
    try:
        base = os.path.join(workdir, "base.raw")
        layout = make_image(base, args.size, MIX, args.seed, SystemFiles())
        _progress(f"image: {args.size / GiB:.2f} GiB, {layout.runs} runs")
        with ceph_cluster(max(4 * GiB, 4 * args.size)) as env:
            cow = CowbackupS3(runner, workdir, env, f"s3://{new_bucket(env, 'cow')}/repo")
            port_url = env["AWS_ENDPOINT_URL"].removeprefix("http://")
            restic = ResticS3(runner, workdir, env, f"s3:http://{port_url}/{new_bucket(env, 'restic')}/repo")
            res = {"cowbackup": one_tool(cow, base, args.size, args.seed, workdir)}
            res["restic"] = one_tool(restic, base, args.size, args.seed, workdir)
        res["cowbackup"]["local_full_s"] = local_full(runner, base, workdir)
        per_gib, full_requests = requests_per_new_gib(cow.results[0], DEFAULT_CHUNK)
        c, r = res["cowbackup"], res["restic"]
        goals = {
            "full backup vs restic (>= 3)": r["full_s"] / c["full_s"],
            "restore vs restic (>= 2)": r["restore_s"] / c["restore_s"],
            "requests per new GiB / (1.1 x GiB/chunk) (<= 1)": per_gib / (1.1 * GiB / DEFAULT_CHUNK),
            "S3 vs local full backup (>= 0.7)": c["local_full_s"] / c["full_s"],
        }
        report = {
            "size": args.size,
            "results": res,
            "cowbackup_requests": [x["requests"] for x in cow.results],
            "full_requests": full_requests,
            "requests_per_new_gib": per_gib,
            "goals": goals,
        }
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            full_r, second_r = (x["requests"] for x in cow.results)
            print(f"\ncowbackup requests: full {full_r}, second {second_r}")
            print(f"requests per GiB of new data: {per_gib:.1f} (goal <= {1.1 * GiB / DEFAULT_CHUNK:.1f})")
            for name, ratio in goals.items():
                print(f"{name:<52} {ratio:6.2f}")
    except BenchError as err:
        print(f"s3_vs_restic: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
