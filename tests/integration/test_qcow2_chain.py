"""An incremental backup chain in qcow2 overlays, taken live, on both daemons in the same test.

::

    disk (raw, exported over NBD; qemu-io writes through the export)
      full      transaction { block-dirty-bitmap-add b0, blockdev-backup sync=full -> full.qcow2 }
      inc1..3   cowbackup backup --qmp --incremental --bitmap b0 --target-format qcow2
                                  --backing-file <previous link>          (the CLI creates the overlay)

    each link:  qemu-io writes (writers idle) -> copy of the disk = the instant T
                -> the job starts at a crawl -> qemu-io writes while it runs (it still runs after them)
                -> block-job-set-speed 0 -> done

    checks:     the link read through its chain == the copy at T           (qemu-img compare)
                qemu-img check clean for every link
                an incremental copies exactly the clusters b0 had dirty at T: the job's len, and the
                bytes the overlay itself maps (qemu-img map depth 0), equal b0's count at T

Writers pause while the disk is copied and until the job has started, so nothing lands between T and
the job's instant; the copy is of the image file, which holds every completed write.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from .conftest import CliProcess, MiB, StartCli, qemu_img, random_file
from .nbd_peers import require
from .test_live_backup import (
    DaemonKind,
    DaemonProcess,
    job_info,
    qmp_connect,
    random_ops,
    run_qemu_io,
    start_daemon,
    wait_event,
    wait_until,
)

__all__ = ["qmp_connect", "start_daemon"]  # the fixtures, used here by name

SIZE = 16 * MiB
C = 64 * 1024
#: Slow enough that every job still runs after its writers (it is set to 0 then).
CRAWL = 64 * 1024
INCREMENTALS = 3


def bitmap_count(client: QEMUMonitorProtocol, name: str) -> int:
    nodes: Any = client.cmd("query-named-block-nodes")
    disk = next(n for n in nodes if n["node-name"] == "disk")
    return int(next(b for b in disk["dirty-bitmaps"] if b["name"] == name)["count"])


def this_layer(image: Path) -> int:
    """Bytes ``qemu-img map`` says the image maps itself (depth 0: data or zero clusters)."""
    proc = qemu_img("map", "--output=json", "-f", "qcow2", str(image))
    assert proc.returncode == 0, proc.stderr
    return sum(e["length"] for e in json.loads(proc.stdout) if e["depth"] == 0)


def check_link(link: Path, at_start: Path) -> None:
    """The link, read through its backing chain, equals the disk at its instant; the image is sound."""
    proc = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(link), str(at_start))
    assert proc.returncode == 0, f"{link.name}: {proc.stdout}{proc.stderr}"
    proc = qemu_img("check", "-f", "qcow2", str(link))
    assert proc.returncode == 0, f"{link.name}: {proc.stdout}{proc.stderr}"


def during_job(d: DaemonProcess, c: QEMUMonitorProtocol, job_id: str, rng: random.Random) -> None:
    """Write while the job runs (it must still run afterwards), then let it finish at full speed."""
    wait_until(lambda: (job_info(c, job_id) or {}).get("status") == "running", f"job {job_id} running")
    run_qemu_io(d.uri, random_ops(rng, SIZE, 80))
    info = job_info(c, job_id)
    assert info is not None and info["status"] == "running", f"{job_id} ended before its writers: {info}"
    c.cmd("block-job-set-speed", device=job_id, speed=0)


def chain(
    kind: DaemonKind,
    workdir: Path,
    start: Callable[[DaemonKind, Path], DaemonProcess],
    connect: Callable[[Path], QEMUMonitorProtocol],
    start_cli: StartCli,
) -> list[dict[str, int]]:
    """Build the chain of the module docstring on one daemon; per link: job len, bitmap count at T,
    and for an incremental the bytes the link maps itself."""
    rng = random.Random(f"chain-{kind}")
    disk = random_file(workdir / f"{kind}-disk.img", SIZE, seed=11)
    d = start(kind, disk)
    c = connect(d.qmp2)
    links: list[dict[str, int]] = []

    run_qemu_io(d.uri, random_ops(rng, SIZE, 60))
    at_start = workdir / f"{kind}-T0.img"
    shutil.copyfile(disk, at_start)
    full = workdir / f"{kind}-full.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(full), str(SIZE)).returncode == 0
    c.cmd(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "full"},
        file={"driver": "file", "filename": str(full)},
    )
    backup = {"job-id": "full", "device": "disk", "target": "full", "sync": "full", "speed": CRAWL}
    c.cmd(
        "transaction",
        actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b0"}},
            {"type": "blockdev-backup", "data": backup},
        ],
    )
    during_job(d, c, "full", rng)
    done = wait_event(c, "BLOCK_JOB_COMPLETED", "full")
    assert "error" not in done, done
    c.cmd("blockdev-del", **{"node-name": "full"})
    check_link(full, at_start)
    links.append({"len": int(done["len"]), "dirty": SIZE})

    previous = full
    for n in range(1, INCREMENTALS + 1):
        run_qemu_io(d.uri, random_ops(rng, SIZE, 40))
        at_start = workdir / f"{kind}-T{n}.img"
        shutil.copyfile(disk, at_start)
        dirty = bitmap_count(c, "b0")
        link = workdir / f"{kind}-inc{n}.qcow2"
        job_id = f"inc{n}"
        cli: CliProcess = start_cli(
            "backup", "--qmp", str(d.qmp), "disk", str(link), "--job-id", job_id, "--json",
            "--incremental", "--bitmap", "b0", "--speed", str(CRAWL),
            "--target-format", "qcow2", "--backing-file", previous.name,
        )  # fmt: skip
        during_job(d, c, job_id, rng)
        done = wait_event(c, "BLOCK_JOB_COMPLETED", job_id)
        assert cli.finish() == 0, cli.stderr()
        assert "error" not in done, done
        check_link(link, at_start)
        links.append({"len": int(done["len"]), "dirty": dirty, "mapped": this_layer(link)})
        previous = link
    assert d.stop() == 0
    return links


def test_an_incremental_chain_in_qcow2_overlays_is_exact_on_both_daemons(
    workdir: Path,
    start_daemon: Callable[[DaemonKind, Path], DaemonProcess],
    qmp_connect: Callable[[Path], QEMUMonitorProtocol],
    start_cli: StartCli,
) -> None:
    require("qemu-io")
    require("qemu-storage-daemon")
    for kind in ("cowbackup", "qemu-storage-daemon"):
        links = chain(kind, workdir, start_daemon, qmp_connect, start_cli)
        assert links[0] == {"len": SIZE, "dirty": SIZE}, kind
        for n, link in enumerate(links[1:], 1):
            # Exactly b0's dirty clusters at T: some, not all (the writes touch part of the disk).
            assert 0 < link["dirty"] < SIZE, (kind, n, link)
            assert link["len"] == link["dirty"] == link["mapped"], (kind, n, link)


def test_backing_file_needs_a_qcow2_target_and_a_qcow2_backing_file(
    workdir: Path, run_cli: Any, start_daemon: Callable[[DaemonKind, Path], DaemonProcess]
) -> None:
    disk = random_file(workdir / "disk.img", SIZE, seed=3)
    d = start_daemon("cowbackup", disk)
    base = ("backup", "--qmp", str(d.qmp), "disk", str(workdir / "inc.qcow2"))
    proc = run_cli(*base, "--backing-file", "full.qcow2")
    assert proc.returncode == 2 and "--backing-file needs --target-format qcow2" in proc.stderr, proc.stderr
    proc = run_cli(*base, "--target-format", "qcow2", "--backing-file", "disk.img")
    assert proc.returncode == 2 and "is not a qcow2 image" in proc.stderr, proc.stderr
    proc = run_cli(*base, "--target-format", "qcow2", "--backing-file", "missing.qcow2")
    assert proc.returncode == 2 and "cannot read backing file" in proc.stderr, proc.stderr
    assert not (workdir / "inc.qcow2").exists()
    # A relative backing file is stored as given, as qemu-img create -b stores it.
    proc = run_cli(*base[:-1], str(workdir / "full.qcow2"), "--target-format", "qcow2")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(*base, "--target-format", "qcow2", "--backing-file", "full.qcow2")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(qemu_img("info", "--output=json", str(workdir / "inc.qcow2")).stdout)
    assert info["backing-filename"] == "full.qcow2" and info["backing-filename-format"] == "qcow2"
    proc = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(workdir / "inc.qcow2"), str(disk))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert d.stop() == 0
