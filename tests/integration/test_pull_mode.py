"""Pull-mode (fleecing) through QMP and NBD, as libvirt drives it, against both daemons.

The daemons and nodes are test_qmp_differential's (``src``: a 4 MiB ``file`` node of data, zeros and
holes; ``tgt0``/``tgt1``: zero-filled 4 MiB files, used as scratch targets).  The recipe::

    blockdev-add      cbw:  copy-before-write, file=src, target=tgt0     <- the instant T
    blockdev-add      snap: snapshot-access, file=cbw, discard=unmap
    block-export-add  g: cbw, writable (the guest writes here)   s: snap, read-only (the backup reads)

While qemu-io rewrites the disk through ``g``, nbdcopy copies ``s``; the copy must equal the source file as
it was at T, and so must a second copy made after all the writes.  nbdinfo reads the view.  Busy nodes
refuse ``blockdev-del`` until the exports and nodes above them are gone.  A second snapshot with a dirty
bitmap answers reads outside the bitmap with an error (EACCES, sent as NBD_EINVAL), and a discard on it
makes the discarded clusters unreadable.  What a client observes is compared between qemu-storage-daemon
and ours; refusal messages differ in wording, so refusals are compared by class.

QEMU refuses a writable export of ``src`` itself next to the snapshot (its permission system); ours
inserts the filter above ``src`` so that such an export writes through it -- tested on ours alone, with
the ``cowbackup pull`` command too.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import IO, Any

from .conftest import cli_command, cli_env
from .nbd_peers import require
from .nbd_server_fixtures import arun_tool
from .test_qmp_differential import (
    CLUSTER,
    SIZE,
    WAIT,
    Backend,
    Obs,
    call,
    daemon,
    differential,
    event_is,
    events_until,
    make_targets,
    source,
)

__all__ = ["source"]  # the fixture, shared with test_qmp_differential

C = CLUSTER


def nbd_uri(b: Backend, export: str) -> str:
    return f"nbd+unix:///{export}?socket={b.workdir / f'{b.kind}-nbd.sock'}"


async def qemu_io(uri: str, *commands: str, read_only: bool = False) -> tuple[int, str]:
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else ["-d", "unmap"])
    for command in commands:
        argv += ["-c", command]
    proc = await arun_tool(*argv, uri)
    return proc.returncode, proc.stdout + proc.stderr


async def nbdcopy(uri: str, dest: Path) -> None:
    proc = await arun_tool("nbdcopy", uri, str(dest))
    assert proc.returncode == 0, proc.stderr


def guest_writes(seed: int, n: int = 48) -> list[str]:
    """qemu-io commands that rewrite random places of the disk: data, zeroes and discards."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        offset = rng.randrange(SIZE // 512 - 256) * 512
        length = rng.randrange(1, 256) * 512
        kind = rng.choice(("write -P {p}", "write -P {p}", "write -z", "discard"))
        out.append(f"{kind.format(p=rng.randrange(1, 255))} {offset} {length}")
    return out


async def export_del(b: Backend, export_id: str) -> Any:
    """block-export-del, then wait for BLOCK_EXPORT_DELETED (QEMU deletes exports asynchronously)."""
    reply = await call(b.client, "block-export-del", {"id": export_id})
    await events_until(b.client, event_is("BLOCK_EXPORT_DELETED"))
    return reply


def refused_class(reply: Any) -> Any:
    """A refusal reduced to its class (the wording differs); anything else as it is."""
    return reply[:2] if isinstance(reply, tuple) else reply


async def pull_script(b: Backend) -> Obs:
    c = b.client
    obs: Obs = []
    src_path = b.workdir / "src.img"
    sock = str(b.workdir / f"{b.kind}-nbd.sock")
    obs.append(await call(c, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}))
    at_t = src_path.read_bytes()
    obs.append(
        await call(
            c,
            "blockdev-add",
            {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgt0"},
        )
    )
    snap = {"driver": "snapshot-access", "node-name": "snap", "file": "cbw", "discard": "unmap"}
    obs.append(await call(c, "blockdev-add", snap))
    obs.append(
        await call(c, "block-export-add", {"type": "nbd", "id": "g", "node-name": "cbw", "writable": True})
    )
    obs.append(await call(c, "block-export-add", {"type": "nbd", "id": "s", "node-name": "snap"}))

    # The backup reads the view while the guest rewrites the disk.
    during = b.workdir / f"{b.kind}-during.img"
    writes = asyncio.ensure_future(qemu_io(nbd_uri(b, "cbw"), *guest_writes(seed=sum(map(ord, b.kind)))))
    await nbdcopy(nbd_uri(b, "snap"), during)
    code, out = await writes
    assert code == 0 and "failed" not in out, out
    equal = {"during": during.read_bytes() == at_t}
    obs.append(("the disk changed", src_path.read_bytes() != at_t))
    after = b.workdir / f"{b.kind}-after.img"
    await nbdcopy(nbd_uri(b, "snap"), after)
    # The copies' contents are not compared: with qemu-storage-daemon 7.2 they differ from T where the
    # guest wrote zeros (the scratch holds the right data there, the copy gets zeros), so only ours are
    # asserted, by the test.
    equal["after"] = after.read_bytes() == at_t
    b.copies_equal_t = equal  # type: ignore[attr-defined]
    info = await arun_tool("nbdinfo", "--size", nbd_uri(b, "snap"))
    obs.append(("nbdinfo --size", info.returncode, info.stdout.strip()))
    info = await arun_tool("nbdinfo", "--map", nbd_uri(b, "snap"))
    obs.append(
        ("nbdinfo --map", info.returncode, sum(int(line.split()[1]) for line in info.stdout.splitlines()))
    )

    # Busy nodes refuse blockdev-del; the snapshot cannot be written.
    for node in ("snap", "cbw", "tgt0"):
        obs.append(("busy", node, refused_class(await call(c, "blockdev-del", {"node-name": node}))))
    code, out = await qemu_io(nbd_uri(b, "snap"), "write 0 512")
    obs.append(("write to the view", code, "failed" in out))

    # Teardown in reverse order.
    obs.append(await export_del(b, "s"))
    obs.append(await call(c, "blockdev-del", {"node-name": "snap"}))
    obs.append(await export_del(b, "g"))
    obs.append(await call(c, "blockdev-del", {"node-name": "cbw"}))
    obs.append(await call(c, "blockdev-del", {"node-name": "tgt0"}))
    return obs


async def bitmap_script(b: Backend) -> Obs:
    """A snapshot of what bitmap ``b`` marks (clusters 3 and 40); reads elsewhere fail; discard."""
    c = b.client
    obs: Obs = []
    sock = str(b.workdir / f"{b.kind}-nbd.sock")
    obs.append(await call(c, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}))
    obs.append(await call(c, "block-dirty-bitmap-add", {"node": "src", "name": "b", "granularity": 4096}))
    obs.append(
        await call(c, "block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True})
    )
    code, out = await qemu_io(
        nbd_uri(b, "src"), f"write -P 5 {3 * C + 4096} 4096", f"write -P 6 {40 * C} {C}"
    )
    assert code == 0, out
    obs.append(await export_del(b, "e"))
    at_t = (b.workdir / "src.img").read_bytes()
    cbw = {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgt1"}
    for bad in ({"node": "src", "name": "nope"}, {"node": "nope", "name": "b"}, {"node": "src"}):
        obs.append(await call(c, "blockdev-add", {**cbw, "bitmap": bad}))
    obs.append(await call(c, "blockdev-add", {**cbw, "bitmap": {"node": "src", "name": "b"}}))
    snap = {"driver": "snapshot-access", "node-name": "snap", "file": "cbw", "discard": "unmap"}
    obs.append(await call(c, "blockdev-add", snap))
    obs.append(
        await call(c, "block-export-add", {"type": "nbd", "id": "g", "node-name": "cbw", "writable": True})
    )
    export = {"type": "nbd", "id": "s", "node-name": "snap", "writable": True}
    obs.append(await call(c, "block-export-add", export))
    code, out = await qemu_io(nbd_uri(b, "cbw"), f"write -P 9 {3 * C} {C}", f"write -P 9 0 {C}")
    assert code == 0, out
    view = nbd_uri(b, "snap")
    for offset, length in ((3 * C, C), (40 * C, C), (0, 512), (4 * C, C), (3 * C, 2 * C)):
        code, out = await qemu_io(view, f"read {offset} {length}", read_only=True)
        obs.append(("read", offset, length, code, "Invalid argument" in out))
    code, out = await qemu_io(view, f"read -v {3 * C} 16", read_only=True)
    obs.append(("cluster 3 as at T", at_t[3 * C : 3 * C + 16].hex() in out.replace(" ", "")))
    code, out = await qemu_io(view, f"discard {40 * C} {C}")
    obs.append(("discard", code, "failed" in out))
    code, out = await qemu_io(view, f"read {40 * C} 512", read_only=True)
    obs.append(("read after discard", code, "Invalid argument" in out))
    obs.append(await export_del(b, "s"))
    obs.append(await export_del(b, "g"))
    for node in ("snap", "cbw", "tgt1"):
        obs.append(await call(c, "blockdev-del", {"node-name": node}))
    return obs


def test_pull_mode_matches_qemu(workdir: Path, source: Path) -> None:
    require("qemu-io", "nbdcopy", "nbdinfo")
    copies: dict[str, dict[str, bool]] = {}

    async def script(b: Backend) -> Obs:
        obs = await pull_script(b)
        copies[b.kind] = b.copies_equal_t  # type: ignore[attr-defined]
        return obs

    seen = differential(workdir, source, script)
    assert seen["ours"] == seen["qemu"]
    assert copies["ours"] == {"during": True, "after": True}, "a copy of the view differs from the disk at T"
    assert ("the disk changed", True) in seen["ours"]


def test_pull_mode_bitmap_and_discard_match_qemu(workdir: Path, source: Path) -> None:
    require("qemu-io")
    seen = differential(workdir, source, bitmap_script)
    assert seen["ours"] == seen["qemu"]
    assert ("read", 0, 512, 1, True) in seen["ours"] and ("read after discard", 1, True) in seen["ours"]


# ---------------------------------------------------------------------------------------------- ours


async def _fleece_under_an_export(b: Backend) -> None:
    """The guest's export stays on ``src``: the filter, inserted above ``src``, takes it over."""
    c = b.client
    sock = str(b.workdir / f"{b.kind}-nbd.sock")
    await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await c.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True})
    src_path = b.workdir / "src.img"
    at_t = src_path.read_bytes()
    await c.execute(
        "blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tgt0"}
    )
    await c.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
    await c.execute("block-export-add", {"type": "nbd", "id": "s", "node-name": "snap"})
    copy = b.workdir / "copy.img"
    writes = asyncio.ensure_future(qemu_io(nbd_uri(b, "src"), *guest_writes(seed=5)))
    await nbdcopy(nbd_uri(b, "snap"), copy)
    code, out = await writes
    assert code == 0 and "failed" not in out, out
    assert copy.read_bytes() == at_t
    assert src_path.read_bytes() != at_t
    await c.execute("block-export-del", {"id": "s"})
    await c.execute("blockdev-del", {"node-name": "snap"})
    await c.execute("blockdev-del", {"node-name": "cbw"})  # the export 'e' goes back to src
    scratch = b.target(0).read_bytes()
    code, out = await qemu_io(nbd_uri(b, "src"), f"write -P 3 {SIZE - C} {C}")
    assert code == 0, out
    assert b.target(0).read_bytes() == scratch  # nothing is copied any more
    await c.execute("blockdev-del", {"node-name": "tgt0"})


def test_filter_takes_over_the_export_of_its_source(workdir: Path, source: Path) -> None:
    require("qemu-io", "nbdcopy")

    make_targets(workdir, "ours")

    async def main(log: IO[bytes]) -> None:
        async with daemon("ours", workdir, source, log) as b:
            await _fleece_under_an_export(b)

    with open(workdir / "ours.log", "wb") as log:
        asyncio.run(asyncio.wait_for(main(log), 60))


async def _pull_cli(b: Backend, release: str) -> None:
    """``cowbackup pull`` on ``src`` (exported writable for the guest on the daemon's running NBD server,
    which pull reuses); release by file or SIGTERM."""
    c = b.client
    nbd_sock = b.workdir / f"{b.kind}-nbd.sock"
    scratch = b.workdir / "scratch.img"
    until = b.workdir / "release"
    src_path = b.workdir / "src.img"
    qmp = str(b.workdir / f"{b.kind}.sock")
    argv = cli_command("pull", "--qmp", qmp, "src", "--scratch", str(scratch), "--socket", str(nbd_sock))
    argv += ["--until-file", str(until)] if release == "file" else []
    at_t = src_path.read_bytes()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode().strip()
        if not line:
            raise AssertionError((await proc.stderr.read()).decode())
        assert line == f"nbd+unix:///src-snapshot?socket={nbd_sock}"
        assert scratch.exists()
        copy = b.workdir / "copy.img"
        writes = asyncio.ensure_future(
            qemu_io(f"nbd+unix:///src?socket={nbd_sock}", *guest_writes(seed=len(release)))
        )
        await nbdcopy(line, copy)
        code, out = await writes
        assert code == 0 and "failed" not in out, out
        assert copy.read_bytes() == at_t and src_path.read_bytes() != at_t
        if release == "file":
            until.touch()
        else:
            proc.terminate()
        stderr = (await asyncio.wait_for(proc.stderr.read(), WAIT)).decode()
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0, stderr
        assert "released" in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    infos: list[dict[str, Any]] = await c.execute("query-named-block-nodes")  # type: ignore[assignment]
    nodes = [n["node-name"] for n in infos]
    assert not [n for n in nodes if n.startswith("pull-")]
    assert not scratch.exists()
    exports: list[dict[str, Any]] = await c.execute("query-block-exports")  # type: ignore[assignment]
    assert [e["id"] for e in exports] == ["e"]
    until.unlink(missing_ok=True)


def test_pull_command_exports_the_frozen_view_until_released(workdir: Path, source: Path) -> None:
    require("qemu-io", "nbdcopy")

    make_targets(workdir, "ours")

    async def main(log: IO[bytes]) -> None:
        async with daemon("ours", workdir, source, log) as b:
            sock = str(workdir / "ours-nbd.sock")
            await b.client.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
            export = {"type": "nbd", "id": "e", "node-name": "src", "writable": True}
            await b.client.execute("block-export-add", export)
            await _pull_cli(b, "file")
            await _pull_cli(b, "signal")  # again on the same daemon, released by SIGTERM

    with open(workdir / "ours.log", "wb") as log:
        asyncio.run(asyncio.wait_for(main(log), 90))


def test_pull_with_a_bitmap_exports_the_views_dirty_map(workdir: Path, source: Path) -> None:
    """``pull --bitmap b``: the view holds the clusters dirty in ``b`` at the instant, and its export
    carries ``qemu:dirty-bitmap:b`` frozen in that same instant -- guest writes afterwards mark the live
    bitmap, not the exported map -- which nbdinfo reads next to the data."""
    require("qemu-io", "nbdinfo")
    make_targets(workdir, "ours")

    async def main(log: IO[bytes]) -> None:
        async with daemon("ours", workdir, source, log) as b:
            c = b.client
            sock = workdir / "ours-nbd.sock"
            guest = f"nbd+unix:///src?socket={sock}"
            await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
            await c.execute(
                "block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True}
            )
            await c.execute("block-dirty-bitmap-add", {"node": "src", "name": "b"})
            code, out = await qemu_io(guest, f"write -P 0x5a {3 * C} {C}", f"write -P 0x5b {40 * C + 7} 100")
            assert code == 0, out
            at_t = (workdir / "src.img").read_bytes()
            scratch, until = workdir / "scratch.img", workdir / "release"
            argv = cli_command(
                "pull", "--qmp", str(workdir / "ours.sock"), "src", "--scratch", str(scratch),
                "--socket", str(sock), "--bitmap", "b", "--until-file", str(until),
            )  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=cli_env(),
            )  # fmt: skip
            try:
                assert proc.stdout is not None and proc.stderr is not None
                uri = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode().strip()
                assert uri, (await proc.stderr.read()).decode()
                code, out = await qemu_io(guest, f"write -P 0x77 {3 * C} {C}", f"write -P 0x78 {10 * C} {C}")
                assert code == 0, out
                mapped = await arun_tool("nbdinfo", "--map=qemu:dirty-bitmap:b", "--json", uri)
                assert mapped.returncode == 0, mapped.stderr
                dirty = [
                    (e["offset"] // C, e["length"] // C) for e in json.loads(mapped.stdout) if e["type"] == 1
                ]
                assert dirty == [(3, 1), (40, 1)]  # not 10: written after the instant
                code, out = await qemu_io(uri, f"read -P 0x5a {3 * C} {C}", read_only=True)
                assert code == 0 and "failed" not in out and "Pattern verification failed" not in out, out
                code, out = await qemu_io(uri, f"read {10 * C} {C}", read_only=True)
                assert "failed" in out  # outside the view: EACCES on the server, an error for the reader
                assert (workdir / "src.img").read_bytes() != at_t
                until.touch()
                stderr = (await asyncio.wait_for(proc.stderr.read(), WAIT)).decode()
                assert await asyncio.wait_for(proc.wait(), WAIT) == 0, stderr
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            bitmaps: list[dict[str, Any]] = await c.execute("query-named-block-nodes")  # type: ignore[assignment]
            (src_info,) = [n for n in bitmaps if n["node-name"] == "src"]
            (live,) = src_info["dirty-bitmaps"]
            assert live["name"] == "b" and live["count"] == 3 * C and not live["busy"]

    with open(workdir / "ours.log", "wb") as log:
        asyncio.run(asyncio.wait_for(main(log), 60))
