"""Persistent bitmaps of a qcow2 node, kept in the image, across daemon restarts -- ours and
qemu-storage-daemon in the same test, on the same steps::

    qemu-img bitmap --add          two bitmaps in the image before any daemon sees it
    start                          they appear in query-named-block-nodes (persistent)
    add b0 persistent, vol         qemu-io writes through the NBD export: qemu-img info -U shows in-use
    merge b0 -> off, remove pre    the image follows
    SIGTERM                        qemu-img info: names, granularities, flags (auto; no in-use); check clean
    restart, write, SIGKILL        restart: the bitmaps that were in use load inconsistent
    backup --incremental           refused with QEMU's message; --fallback-full takes a full backup

Every observation (query output, bitmap hashes, ``qemu-img info``) is compared between the daemons and
checked against the values QEMU's documentation gives.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from .conftest import RunCli, qemu_img
from .nbd_peers import require
from .test_cli_live import one_line_error
from .test_live_backup import (
    DEADLINE,
    DaemonKind,
    DaemonProcess,
    daemon_argv,
    kill_all,
    launch,
    qmp_connect,
)

__all__ = ["qmp_connect"]  # the fixture, used here by name

C = 64 * 1024
SIZE = 4 * 1024 * 1024
KINDS: tuple[DaemonKind, ...] = ("cowbackup", "qemu-storage-daemon")

StartQcow2 = Callable[[DaemonKind, Path], DaemonProcess]


def qcow2_daemon_argv(kind: DaemonKind, image: Path, workdir: Path) -> list[str]:
    """Both daemons with the same options: node ``disk`` = qcow2 over file node ``f``."""
    nodes = [f"driver=file,node-name=f,filename={image}", "driver=qcow2,node-name=disk,file=f"]
    return daemon_argv(kind, image, workdir, nodes)


@pytest.fixture
def start_qcow2(workdir: Path) -> Iterator[StartQcow2]:
    """Start a daemon on a qcow2 image; ready once its pidfile names it.  All are killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(kind: DaemonKind, image: Path) -> DaemonProcess:
        return launch(kind, qcow2_daemon_argv(kind, image, workdir), workdir, started)

    yield start
    kill_all(started)


def qemu_io(d: DaemonProcess, *commands: str) -> None:
    """Run qemu-io commands on the daemon's export (raw over NBD); every one must succeed."""
    args = [a for c in commands for a in ("-c", c)]
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", *args, d.uri], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr


def write(d: DaemonProcess, *clusters: int) -> None:
    qemu_io(d, *(f"write -P 0x{0x40 + n:x} {n * C + 100} 1000" for n in clusters))


def bitmaps(client: QEMUMonitorProtocol) -> list[dict[str, Any]]:
    """``dirty-bitmaps`` of node ``disk`` as query-named-block-nodes lists them."""
    nodes: Any = client.cmd("query-named-block-nodes")
    node = next(n for n in nodes if n["node-name"] == "disk")
    return [dict(b) for b in node.get("dirty-bitmaps", [])]


def image_bitmaps(image: Path) -> list[dict[str, Any]]:
    """The bitmaps ``qemu-img info`` reads from the image (-U: a daemon may hold it open)."""
    proc = qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(image))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)["format-specific"]["data"]
    return list(data.get("bitmaps", []))


def check_clean(image: Path) -> None:
    proc = qemu_img("check", "-f", "qcow2", str(image))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sha(client: QEMUMonitorProtocol, name: str) -> str:
    reply: Any = client.cmd("x-debug-block-dirty-bitmap-sha256", node="disk", name=name)
    return str(reply["sha256"])


def scenario(
    kind: DaemonKind,
    workdir: Path,
    start: StartQcow2,
    connect: Callable[[Path], QEMUMonitorProtocol],
    run_cli: RunCli,
) -> dict[str, Any]:
    """Run the steps of the module docstring on one daemon; what each step showed."""
    image = workdir / f"{kind}.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(image), str(SIZE)).returncode == 0
    assert qemu_img("bitmap", "--add", str(image), "pre").returncode == 0
    assert qemu_img("bitmap", "--add", "-g", "4096", "--disable", str(image), "off").returncode == 0
    seen: dict[str, Any] = {}

    d = start(kind, image)
    c = connect(d.qmp2)
    seen["loaded"] = bitmaps(c)
    c.cmd("block-dirty-bitmap-add", node="disk", name="b0", persistent=True)
    c.cmd("block-dirty-bitmap-add", node="disk", name="vol")
    write(d, 2, 5)
    seen["in use"] = image_bitmaps(image)
    c.cmd("block-dirty-bitmap-merge", node="disk", target="off", bitmaps=["b0"])
    c.cmd("block-dirty-bitmap-remove", node="disk", name="pre")
    seen["changed"] = bitmaps(c)
    seen["sha"] = [sha(c, "b0"), sha(c, "off")]
    assert d.stop() == 0
    seen["stored"] = image_bitmaps(image)
    check_clean(image)

    d = start(kind, image)
    c = connect(d.qmp2)
    seen["reloaded"] = bitmaps(c)
    seen["sha again"] = [sha(c, "b0"), sha(c, "off")]
    write(d, 7)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(DEADLINE)
    seen["after kill"] = image_bitmaps(image)

    d = start(kind, image)
    c = connect(d.qmp2)
    seen["inconsistent"] = bitmaps(c)
    target = workdir / f"{kind}-full.img"
    incremental = ("backup", "--qmp", str(d.qmp), "disk", str(target), "--incremental", "--bitmap", "b0")
    one_line_error(
        run_cli(*incremental), "cowbackup: GenericError: Bitmap 'b0' is inconsistent and cannot be used"
    )
    proc = run_cli(*incremental, "--fallback-full", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "bitmap 'b0' is inconsistent: taking a full backup instead" in proc.stderr
    seen["fallback"] = bitmaps(c)
    assert d.stop() == 0
    # The full backup holds every write, the last one too.
    proc = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(target), str(image))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen["final"] = image_bitmaps(image)
    check_clean(image)
    return seen


def test_qcow2_bitmaps_live_in_the_image_as_in_qemu(
    workdir: Path,
    start_qcow2: StartQcow2,
    qmp_connect: Callable[[Path], QEMUMonitorProtocol],
    run_cli: RunCli,
) -> None:
    require("qemu-io")
    ours = scenario("cowbackup", workdir, start_qcow2, qmp_connect, run_cli)
    theirs = scenario("qemu-storage-daemon", workdir, start_qcow2, qmp_connect, run_cli)
    # Beyond QEMU, a new persistent bitmap is stored at once (in use), so that a crash leaves it
    # inconsistent instead of gone; QEMU first writes it when it closes the image.
    assert {"name": "b0", "granularity": C, "flags": ["in-use", "auto"]} in ours["in use"]
    ours["in use"] = [b for b in ours["in use"] if b["name"] != "b0"]
    differ = {step: (ours[step], theirs[step]) for step in ours if ours[step] != theirs[step]}
    assert not differ, json.dumps(differ, indent=1)

    def entry(name: str, granularity: int, count: int, recording: bool = True, **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "recording": recording,
            "persistent": True,
            "busy": False,
            "granularity": granularity,
            "count": count,
            **more,
        }

    # Independent of QEMU: what its documentation promises.
    assert ours["loaded"] == [entry("off", 4096, 0, recording=False), entry("pre", C, 0)]
    assert ours["in use"] == [
        {"name": "pre", "granularity": C, "flags": ["in-use", "auto"]},
        {"name": "off", "granularity": 4096, "flags": ["in-use"]},
    ]
    # merge ORs b0's two 64 KiB granules into off's 4 KiB ones; vol was never persistent.
    assert ours["changed"] == [
        entry("vol", C, 2 * C, persistent=False),
        entry("b0", C, 2 * C),
        entry("off", 4096, 2 * C, recording=False),
    ]
    assert ours["stored"] == [
        {"name": "off", "granularity": 4096, "flags": []},
        {"name": "b0", "granularity": C, "flags": ["auto"]},
    ]
    assert ours["reloaded"] == [entry("b0", C, 2 * C), entry("off", 4096, 2 * C, recording=False)]
    assert ours["sha again"] == ours["sha"]
    assert [b["flags"] for b in ours["after kill"]] == [["in-use"], ["in-use", "auto"]]
    assert ours["inconsistent"] == [
        entry("b0", C, 0, recording=False, inconsistent=True),
        entry("off", 4096, 0, recording=False, inconsistent=True),
    ]
    assert ours["fallback"][0] == entry("b0", C, 0)
    assert [(b["name"], b["flags"]) for b in ours["final"]] == [("off", ["in-use"]), ("b0", ["auto"])]


def test_refusals_of_persistent_bitmaps_are_qemus(
    workdir: Path, start_qcow2: StartQcow2, qmp_connect: Callable[[Path], QEMUMonitorProtocol]
) -> None:
    """A qcow2 v2 image cannot store bitmaps; a name too long for the image is refused by the image's
    rules first.  Both daemons give the same error for each."""
    errors: dict[DaemonKind, list[str]] = {}
    for kind in KINDS:
        image = workdir / f"{kind}-v2.qcow2"
        assert (
            qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(image), str(SIZE)).returncode
            == 0
        )
        d = start_qcow2(kind, image)
        c = qmp_connect(d.qmp2)
        v2 = c.cmd_raw("block-dirty-bitmap-add", {"node": "disk", "name": "b", "persistent": True})
        assert d.stop() == 0
        image = workdir / f"{kind}-v3.qcow2"
        assert qemu_img("create", "-q", "-f", "qcow2", str(image), str(SIZE)).returncode == 0
        d = start_qcow2(kind, image)
        c = qmp_connect(d.qmp2)
        long = c.cmd_raw("block-dirty-bitmap-add", {"node": "disk", "name": "n" * 1024, "persistent": True})
        assert bitmaps(c) == []
        assert d.stop() == 0
        errors[kind] = [v2["error"]["desc"], long["error"]["desc"]]
    assert errors["cowbackup"] == errors["qemu-storage-daemon"]
    name = "n" * 1024
    assert errors["cowbackup"] == [
        "Can't make bitmap 'b' persistent in 'disk': Cannot store dirty bitmaps in qcow2 v2 files",
        f"Can't make bitmap '{name}' persistent in 'disk': Name length exceeds maximum (1023 characters)",
    ]
