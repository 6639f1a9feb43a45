"""``tls-creds-x509`` objects: ``object-add``/``object-del``/``--object``, named by ``tls-creds``.

The same QMP script runs against qemu-storage-daemon 7.2 and ``cowbackup daemon``, and every reply --
successes, error classes and messages -- must be equal.  Then the objects are used for real: a daemon
started with ``--object ... --nbd-server ...,tls-creds=ID`` serves over TLS to qemu-img and nbdinfo, and
a ``blockdev-add`` of an ``nbd`` node with a client object reads from ``qemu-nbd --tls-creds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from pathlib import Path
from typing import IO, Any

import pytest
from qemu.qmp import QMPClient

from cowbackup.block.drivers.nbd import nbd_options_from_uri
from cowbackup.block.errors import BlockError
from cowbackup.block.objects import ObjectRegistry

from .conftest import MiB, cli_command, cli_env, connect_qmp, random_file, wait_listening
from .nbd_peers import make_tls_creds, qemu_nbd, require
from .test_qmp_differential import QSD, WAIT, call

TOOL_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("openssl")
    return make_tls_creds(tmp_path_factory.mktemp("creds"))


def _log(path: Path) -> IO[bytes]:
    return path.open("wb")


async def _start(kind: str, workdir: Path, *extra: str) -> tuple[asyncio.subprocess.Process, QMPClient]:
    sock = workdir / f"{kind}-qmp.sock"
    argv = [QSD] if kind == "qemu" else cli_command("daemon")
    argv += [*extra, "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"]
    with _log(workdir / f"{kind}.log") as log:  # the daemon keeps its own descriptor
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log, env=cli_env())
    await wait_listening(sock, proc, f"{kind} daemon", WAIT)
    client = QMPClient(kind)
    await connect_qmp(client, sock, WAIT)
    return proc, client


async def _stop(proc: asyncio.subprocess.Process, client: QMPClient) -> None:
    await call(client, "quit")
    with contextlib.suppress(EOFError):  # the daemon may hang up before the client says goodbye
        await client.disconnect()
    await asyncio.wait_for(proc.wait(), WAIT)


async def _script(kind: str, workdir: Path, creds: Path) -> list[Any]:
    proc, c = await _start(kind, workdir)
    nbd_sock = workdir / f"{kind}-nbd.sock"
    nowhere = {"type": "unix", "path": str(workdir / "nobody.sock")}
    tls = {"qom-type": "tls-creds-x509", "dir": str(creds)}
    obs: list[Any] = []
    try:
        for args in (
            {**tls, "id": "srv", "endpoint": "server"},
            {**tls, "id": "srv", "endpoint": "server"},  # duplicate
            {**tls, "id": "cli", "endpoint": "client"},
            {**tls, "id": "cli2", "verify-peer": False},  # endpoint defaults to client
            {**tls, "id": "bad", "dir": str(workdir / "none")},
            {**tls, "id": "bad", "endpoint": "sideways"},
            {**tls, "id": "1bad"},
            {**tls, "id": "bad", "bogus": 1},
            {**tls, "id": "bad", "verify-peer": "on"},  # QMP is typed
            {"qom-type": "tls-creds-x509", "id": "bad"},
            {"qom-type": "no-such-type", "id": "bad"},
            {"id": "bad"},
        ):
            obs.append(await call(c, "object-add", args))
        addr = {"type": "unix", "data": {"path": str(nbd_sock)}}
        for tls_creds in ("nope", "cli", "srv"):
            obs.append(await call(c, "nbd-server-start", {"addr": addr, "tls-creds": tls_creds}))
        for node, tls_creds in (("n1", "nope"), ("n2", "srv")):
            obs.append(
                await call(
                    c,
                    "blockdev-add",
                    {"driver": "nbd", "node-name": node, "server": nowhere, "tls-creds": tls_creds},
                )
            )
        # The server option is checked before the credentials.
        obs.append(await call(c, "blockdev-add", {"driver": "nbd", "node-name": "n3", "tls-creds": "nope"}))
        obs.append(await call(c, "object-del", {"id": "srv"}))  # in use by the server: allowed
        obs.append(await call(c, "object-del", {"id": "srv"}))
        obs.append(await call(c, "object-del", {}))
        obs.append(await call(c, "query-block"))
    finally:
        await _stop(proc, c)
    return obs


def test_object_replies_match_qemu(workdir: Path, creds: Path) -> None:
    require(QSD)
    seen = {kind: asyncio.run(_script(kind, workdir, creds)) for kind in ("qemu", "ours")}
    for q, o in zip(seen["qemu"], seen["ours"], strict=True):
        assert o == q
    # Not all refusals: the first object was made, and the server started with it (the 15th call).
    assert seen["ours"][0] == {} and seen["ours"][14] == {}


def _tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)


def test_tls_server_and_client_from_objects(workdir: Path, creds: Path) -> None:
    require("qemu-img", "nbdinfo", "qemu-nbd")
    image = random_file(workdir / "disk.img", 2 * MiB, seed=5)
    remote = random_file(workdir / "remote.img", MiB, seed=6)
    nbd_sock = workdir / "nbd.sock"

    async def body(remote_peer_options: dict[str, Any]) -> None:
        proc, c = await _start(
            "ours",
            workdir,
            "--object",
            f"tls-creds-x509,id=srv,dir={creds},endpoint=server",
            "--object",
            json.dumps({"qom-type": "tls-creds-x509", "id": "cli", "dir": str(creds)}),
            "--blockdev",
            f"driver=file,node-name=disk,filename={image}",
            "--nbd-server",
            f"addr.type=unix,addr.path={nbd_sock},tls-creds=srv",
            "--export",
            "type=nbd,id=e,node-name=disk,name=disk",
        )
        try:
            # qemu-img, a TLS client with its own object; a plaintext client is refused.
            tls_img = (
                f"driver=nbd,server.type=unix,server.path={nbd_sock},export=disk,"
                "tls-creds=c0,tls-hostname=localhost"
            )
            obj = f"tls-creds-x509,id=c0,dir={creds},endpoint=client"
            out = await asyncio.to_thread(
                _tool,
                "qemu-img",
                "convert",
                "--object",
                obj,
                "--image-opts",
                tls_img,
                "-O",
                "raw",
                str(workdir / "copy.img"),
            )
            assert out.returncode == 0, out.stderr
            assert (workdir / "copy.img").read_bytes() == image.read_bytes()
            plain = await asyncio.to_thread(_tool, "nbdinfo", f"nbd+unix:///disk?socket={nbd_sock}")
            assert plain.returncode != 0
            info = await asyncio.to_thread(
                _tool, "nbdinfo", "--json", f"nbds+unix:///disk?socket={nbd_sock}&tls-certificates={creds}"
            )
            assert info.returncode == 0, info.stderr
            assert json.loads(info.stdout)["exports"][0]["export-size"] == 2 * MiB
            # Our nbd driver with the client object, against qemu-nbd with TLS.
            reply = await call(
                c,
                "blockdev-add",
                {"driver": "nbd", "node-name": "remote", "tls-creds": "cli", **remote_peer_options},
            )
            assert reply == {}, reply
            sha = await call(c, "query-named-block-nodes")
            assert any(n["node-name"] == "remote" and n["image"]["virtual-size"] == MiB for n in sha)
        finally:
            await _stop(proc, c)

    with qemu_nbd(workdir, remote, tls_dir=creds) as peer:
        run_options = {"server": peer.server_options()}
        asyncio.run(body(run_options))


def test_a_directory_without_a_slash_is_still_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pki").mkdir()
    objects = ObjectRegistry()
    assert objects.tls_creds("pki", "client").dir == "pki"
    with pytest.raises(BlockError, match="No TLS credentials with id 'pkx'"):
        objects.tls_creds("pkx", "client")
    # From a URI: always a directory, made absolute so it cannot be taken for an id.
    options = nbd_options_from_uri("nbds+unix:///e?socket=/run/x.sock&tls-certificates=pki")
    assert options["tls-creds"] == str(tmp_path / "pki")


def test_registry_refusals(tmp_path: Path) -> None:
    objects = ObjectRegistry()
    with pytest.raises(BlockError, match="Parameter 'priority' is not supported"):
        objects.add({"qom-type": "tls-creds-x509", "id": "a", "dir": str(tmp_path), "priority": "NORMAL"})
    with pytest.raises(BlockError, match=r"Unable to access credentials .*ca-cert\.pem"):
        objects.add({"qom-type": "tls-creds-x509", "id": "a", "dir": str(tmp_path), "endpoint": "server"})
    assert "a" not in objects
    # A path is taken as a credentials directory (ours); an id must name an object.
    creds = objects.tls_creds(str(tmp_path), "server")
    assert creds.dir == str(tmp_path) and creds.verify_peer
    with pytest.raises(BlockError, match="No TLS credentials with id 'x'"):
        objects.tls_creds("x", "client")
