"""``cowbackup serve`` against the real NBD peers: qemu-io, qemu-img, nbdinfo, nbdcopy, libnbd (nbdsh).

Each test serves a fresh copy of a sparse image (data, written zeros and holes at 4 KiB granularity on
tmpfs, so holes are exact) and checks what the peer sees against the file itself: the bytes, the
allocation map, the export's flags, the errors the spec asks for, and that holes stay holes when data
is copied through the export in either direction.  TLS is checked with certificates made by ``openssl``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    Image,
    KiB,
    MiB,
    SegmentKind,
    allocated,
    assert_same_content,
    build_image,
    layout,
    random_file,
)
from .nbd_server_fixtures import (
    ExportSpec,
    ServedImage,
    acheck_tool,
    check_tool,
    file_extents,
    in_process_server,
    make_tls_creds,
    merge_extents,
    nbdinfo_map,
    nbdsh_script,
    qemu_map,
    require_libnbd_python,
    require_tools,
    run_tool,
    script_result,
    serve,
    system_python_env,
)

SIZE = 24 * MiB
#: Data, written zeros and holes, none of them 64 KiB aligned everywhere; repeated to fill SIZE.
PATTERN: list[tuple[int, SegmentKind]] = [
    (1 * MiB, "data"),
    (512 * KiB, "hole"),
    (256 * KiB, "zero"),
    (64 * KiB, "data"),
    (1 * MiB + 4 * KiB, "hole"),
    (4 * KiB, "data"),
    (60 * KiB, "hole"),
    (2 * MiB, "data"),
    (3 * MiB, "hole"),
]


@pytest.fixture(scope="module", autouse=True)
def _peers() -> None:
    require_tools("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")


@pytest.fixture(scope="module")
def source(module_workdir: Path) -> Image:
    """The reference image (never served, never changed)."""
    return build_image(module_workdir / "source.img", SIZE, layout(SIZE, PATTERN), seed=7)


@pytest.fixture
def disk(workdir: Path) -> Image:
    """A copy of ``source``, built the same way (same holes), for one test to serve and change."""
    return build_image(workdir / "disk.img", SIZE, layout(SIZE, PATTERN), seed=7)


@pytest.fixture
def served(disk: Image, workdir: Path) -> Iterator[ServedImage]:
    """``cowbackup serve disk.img`` (writable, default export)."""
    with serve(disk.path, workdir) as s:
        yield s


def data_extents(path: Path) -> list[tuple[int, int]]:
    return [(start, end) for start, end, data in file_extents(path) if data]


def holes_kept(result: Path, source: Path) -> None:
    """Every byte allocated in ``result`` is allocated in ``source`` too: no hole was filled."""
    source_data = data_extents(source)
    for start, end in data_extents(result):
        assert any(s <= start and end <= e for s, e in source_data), (
            f"[{start}, {end}) of {result} is allocated where {source} has a hole: {source_data}"
        )


# ---------------------------------------------------------------------------------------------- qemu-io


def qemu_io(uri: str, *commands: str) -> str:
    args = [arg for command in commands for arg in ("-c", command)]
    out = check_tool("qemu-io", "-f", "raw", *args, uri)
    assert "failed" not in out, out
    return out


def test_qemu_io_writes_zeroes_discards_and_reads_back(served: ServedImage, disk: Image) -> None:
    expected = bytearray(disk.path.read_bytes())

    def fill(offset: int, length: int, byte: int) -> None:
        expected[offset : offset + length] = bytes([byte]) * length

    writes = [
        ("write -P 0xcd 1000 70000", 1000, 70000, 0xCD),  # unaligned, across a data/hole boundary
        ("write -P 0x5a 131072 65536", 131072, 65536, 0x5A),  # aligned
        ("write -z 300001 99999", 300001, 99999, 0),  # unaligned zeroes inside data
        ("write -z 1048576 131072", 1048576, 131072, 0),  # aligned zeroes over a hole
        ("write -z -u 1835008 65536", 1835008, 65536, 0),  # zeroes that may unmap, over data
        ("discard 3145728 1048576", 3145728, 1048576, 0),  # serve opens discard=unmap: a hole, zeros
        ("discard 5000001 70001", 5000001, 70001, 0),  # unaligned discard
        ("aio_write -P 0x21 8388608 65536", 8388608, 65536, 0x21),  # several in flight at once
        ("aio_write -P 0x22 8454144 65536", 8454144, 65536, 0x22),
        ("aio_write -P 0x23 8519680 4096", 8519680, 4096, 0x23),
        ("aio_write -P 0x24 9000001 12345", 9000001, 12345, 0x24),
        ("aio_write -P 0x25 23068672 1048576", 23068672, 1048576, 0x25),  # the last MiB
    ]
    qemu_io(served.uri, *(command for command, *_ in writes), "aio_flush")
    for _, offset, length, byte in writes:
        fill(offset, length, byte)

    # what a reader sees: each pattern where it was written (a later write wins where they overlap)
    reads = [
        "read -P 0xcd 1000 70000",
        "read -P 0x5a 131072 65536",
        "read -P 0 300001 99999",
        "read -P 0 1048576 131072",
        "read -P 0 1835008 65536",
        "read -P 0 3145728 1048576",
        "read -P 0 5000001 70001",
        "read -P 0x21 8388608 65536",
        "read -P 0x22 8454144 65536",
        "read -P 0x23 8519680 4096",
        "read -P 0x24 9000001 12345",
        "read -P 0x25 23068672 1048576",
        "read -v 999 3",  # unaligned, one byte of the source before the first write
    ]
    out = qemu_io(served.uri, *reads)
    assert out.count("read ") == len(reads), out
    assert f"{expected[999]:02x} cd cd" in out, out
    # and the served file itself holds exactly that, nothing more
    assert disk.path.read_bytes() == expected


def test_qemu_io_pattern_mismatch_is_detected(served: ServedImage) -> None:
    """The read checks above are real: a wrong pattern fails qemu-io."""
    qemu_io(served.uri, "write -P 0x77 0 4096")
    proc = run_tool("qemu-io", "-f", "raw", "-c", "read -P 0x78 0 4096", served.uri)
    assert proc.returncode != 0
    assert "Pattern verification failed" in proc.stdout


# ---------------------------------------------------------------------------------------------- qemu-img


def test_qemu_img_info(served: ServedImage, disk: Image) -> None:
    info = json.loads(check_tool("qemu-img", "info", "--output=json", served.uri))
    assert info["format"] == "raw"
    assert info["virtual-size"] == disk.size


def test_qemu_img_compare(served: ServedImage, source: Image) -> None:
    out = check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri, str(source.path))
    assert "Images are identical" in out
    qemu_io(served.uri, "write -P 0x01 20000000 1")
    proc = run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri, str(source.path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"Content mismatch at offset {20000000 // 512 * 512}" in proc.stdout  # qemu-img's sectors


def test_qemu_img_convert_from_export(served: ServedImage, source: Image, workdir: Path) -> None:
    out = workdir / "out.img"
    check_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(out))
    assert_same_content(out, source.path)
    holes_kept(out, source.path)
    assert allocated(out) <= allocated(source.path)


def test_qemu_img_convert_into_existing_export(source: Image, workdir: Path) -> None:
    """``convert -n`` into an export full of other data: same bytes, and the source's holes punched."""
    target = random_file(workdir / "target.img", SIZE, seed=99)
    with serve(target, workdir) as s:
        check_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source.path), s.uri)
        check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, str(source.path))
    assert_same_content(target, source.path)
    holes_kept(target, source.path)


def test_qemu_img_map_matches_the_file(served: ServedImage, disk: Image) -> None:
    over_nbd = qemu_map(served.uri)
    assert over_nbd == qemu_map(str(disk.path))
    holes = [e for e in over_nbd if not e["data"]]
    assert holes and all(e["zero"] for e in holes), over_nbd


def test_tcp_port_zero_prints_the_bound_port(disk: Image, source: Image, workdir: Path) -> None:
    with serve(disk.path, workdir, bind="127.0.0.1:0") as s:
        assert s.uri.startswith("nbd://127.0.0.1:") and s.uri.endswith("/")
        assert int(s.uri.split(":")[2].rstrip("/")) > 0
        check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, str(source.path))
        assert check_tool("nbdinfo", "--size", s.uri).strip() == str(SIZE)


# ---------------------------------------------------------------------------------------------- nbdinfo


def test_nbdinfo_list_single_named_export(disk: Image, source: Image, workdir: Path) -> None:
    name = "vm disk/ü?&#"  # every character that needs quoting in the URI
    with serve(disk.path, workdir, "--name", name) as s:
        assert s.uri.startswith("nbd+unix:///vm%20disk%2F%C3%BC%3F%26%23?socket=")
        listing = json.loads(check_tool("nbdinfo", "--list", "--json", s.uri))
        check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri, str(source.path))
    assert [(e["export-name"], e["export-size"]) for e in listing["exports"]] == [(name, SIZE)]


def test_nbdinfo_list_two_exports_in_process(workdir: Path) -> None:
    alpha = random_file(workdir / "alpha.img", 1 * MiB, seed=1)
    beta = random_file(workdir / "beta.img", 3 * MiB, seed=2)

    async def scenario() -> dict[str, Any]:
        exports = [ExportSpec("alpha", alpha), ExportSpec("beta", beta, writable=False)]
        async with in_process_server(workdir / "two.sock", exports) as srv:
            listing: dict[str, Any] = json.loads(await acheck_tool("nbdinfo", "--list", "--json", srv.uri()))
            # each export is reachable by its name with its own content
            out = await acheck_tool("qemu-io", "-r", "-f", "raw", "-c", "read -v 0 4", srv.uri("beta"))
            assert beta.read_bytes()[:4].hex(" ") in out, out
            return listing

    listing = asyncio.run(scenario())
    seen = {e["export-name"]: (e["export-size"], e["is_read_only"]) for e in listing["exports"]}
    assert seen == {"alpha": (1 * MiB, False), "beta": (3 * MiB, True)}


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_nbdinfo_json_flags(disk: Image, workdir: Path, read_only: bool) -> None:
    with serve(disk.path, workdir, *(["--read-only"] if read_only else [])) as s:
        info = json.loads(check_tool("nbdinfo", "--json", s.uri))
    (export,) = info["exports"]
    assert info["TLS"] is False
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is read_only
    assert export["can_trim"] is not read_only
    assert export["can_zero"] is not read_only
    assert export["can_flush"] is True
    assert export["can_fua"] is True
    assert export["can_multi_conn"] is True
    assert "base:allocation" in export["contexts"]


def test_nbdinfo_map_matches_the_file(served: ServedImage, disk: Image) -> None:
    assert nbdinfo_map(served.uri) == merge_extents(file_extents(disk.path))


# ---------------------------------------------------------------------------------------------- nbdcopy


def test_nbdcopy_from_export_keeps_holes(served: ServedImage, source: Image, workdir: Path) -> None:
    out = workdir / "copy.img"
    out.touch()
    check_tool("nbdcopy", served.uri, str(out))
    assert_same_content(out, source.path)
    holes_kept(out, source.path)
    # nbdcopy also leaves out the written zeros: at most the source's real data is allocated
    assert allocated(out) <= source.data_bytes


def test_nbdcopy_into_export_keeps_holes(source: Image, workdir: Path) -> None:
    """From a sparse file into an export full of other data: the served file ends up as sparse."""
    target = random_file(workdir / "target.img", SIZE, seed=98)
    with serve(target, workdir) as s:
        check_tool("nbdcopy", str(source.path), s.uri)
    assert_same_content(target, source.path)
    holes_kept(target, source.path)
    assert allocated(target) <= allocated(source.path)


# ---------------------------------------------------------------------------------------------- libnbd


ERRORS_SIZE = 48 * MiB  # room for a write over the 32 MiB maximum that is not also past the end


@pytest.fixture
def errors_disk(workdir: Path) -> Image:
    """Data in the first 8 KiB, a hole after it (the script expects zeros at 12344..12348 and the end)."""
    pattern: list[tuple[int, SegmentKind]] = [(8 * KiB, "data"), (ERRORS_SIZE - 8 * KiB, "hole")]
    return build_image(workdir / "errors.img", ERRORS_SIZE, layout(ERRORS_SIZE, pattern), seed=5)


def test_libnbd_error_replies_writable(errors_disk: Image, workdir: Path) -> None:
    require_libnbd_python()
    before = errors_disk.path.read_bytes()
    with serve(errors_disk.path, workdir) as s:
        results = script_result(
            run_tool(*nbdsh_script("nbdsh_errors.py", s.uri, "rw"), env=system_python_env())
        )
    expected = {
        "read crossing the end": "EINVAL",
        "read beyond the end": "EINVAL",
        "trim beyond the end": "EINVAL",
        "cache beyond the end": "EINVAL",
        "oversized read": "EINVAL",
        "unknown flag 0x80": "EINVAL",
        "unknown flag 0x8000": "EINVAL",
        "REQ_ONE on a read": "EINVAL",
        "unaligned read": "ok",
        "flush": "ok",
        "write crossing the end": "ENOSPC",
        "write zeroes beyond the end": "ENOSPC",
        "oversized write": "EINVAL",
        "NO_HOLE on a write": "EINVAL",
        "REQ_ONE on a trim": "EINVAL",
        "unaligned write": "ok",
        "unaligned write reads back": True,
        "end untouched": True,
    }
    assert {case: r["result"] for case, r in results.items()} == expected
    assert {case for case, r in results.items() if r["usable"] is not True} == set()
    # only the unaligned write changed the file
    after = errors_disk.path.read_bytes()
    assert after[12345:12348] == b"abc"
    assert after[:12345] == before[:12345] and after[12348:] == before[12348:]


def test_libnbd_error_replies_read_only(errors_disk: Image, workdir: Path) -> None:
    require_libnbd_python()
    before = errors_disk.path.read_bytes()
    with serve(errors_disk.path, workdir, "--read-only") as s:
        results = script_result(
            run_tool(*nbdsh_script("nbdsh_errors.py", s.uri, "ro"), env=system_python_env())
        )
    assert {case: r["result"] for case, r in results.items()} == {
        "read crossing the end": "EINVAL",
        "read beyond the end": "EINVAL",
        "trim beyond the end": "EPERM",  # read-only comes first, as for any write
        "cache beyond the end": "EINVAL",
        "oversized read": "EINVAL",
        "unknown flag 0x80": "EINVAL",
        "unknown flag 0x8000": "EINVAL",
        "REQ_ONE on a read": "EINVAL",
        "unaligned read": "ok",
        "flush": "ok",
        "write": "EPERM",
        "trim": "EPERM",
        "write zeroes": "EPERM",
    }
    assert {case for case, r in results.items() if r["usable"] is not True} == set()
    assert errors_disk.path.read_bytes() == before


# ---------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_creds(module_workdir: Path) -> Path:
    require_tools("openssl")
    return make_tls_creds(module_workdir / "tls")


def qemu_io_tls(creds: Path, s: ServedImage, export: str, *commands: str) -> list[str]:
    """qemu-io over TLS (``--image-opts``; QEMU needs a host name to check even on a Unix socket)."""
    opts = (
        f"driver=nbd,server.type=unix,server.path={s.socket},export={export},"
        "tls-creds=tls0,tls-hostname=localhost"
    )
    args = [arg for command in commands for arg in ("-c", command)]
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}"
    return ["qemu-io", "--object", obj, "--image-opts", opts, *args]


def tls_uri(s: ServedImage, export: str, creds: Path) -> str:
    return f"nbds+unix:///{export}?socket={s.socket}&tls-certificates={creds}"


def test_tls_qemu_io_and_nbdinfo(tls_creds: Path, disk: Image, workdir: Path) -> None:
    with serve(disk.path, workdir, "--name", "secure", "--tls-creds", str(tls_creds)) as s:
        assert s.uri.startswith("nbds+unix:///secure?")
        out = check_tool(
            *qemu_io_tls(tls_creds, s, "secure", "write -P 0x3c 4097 65535", "read -P 0x3c 4097 65535")
        )
        assert "failed" not in out, out
        info = json.loads(check_tool("nbdinfo", "--json", tls_uri(s, "secure", tls_creds)))
        assert info["TLS"] is True
        assert info["exports"][0]["export-size"] == SIZE
        # qemu-img sees the TLS export like any other (json: filename, -f raw)
        target = {
            "file": {
                "driver": "nbd",
                "server": {"type": "unix", "path": str(s.socket)},
                "export": "secure",
                "tls-creds": "tls0",
                "tls-hostname": "localhost",
            }
        }
        obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_creds}"
        proc = run_tool("qemu-io", "--object", obj, "-f", "raw", "-c", "read -P 0x3c 4097 1",
                        "json:" + json.dumps(target))  # fmt: skip
        assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr
    assert disk.path.read_bytes()[4097 : 4097 + 65535] == b"\x3c" * 65535


def test_tls_required_plain_clients_refused(tls_creds: Path, disk: Image, workdir: Path) -> None:
    before = disk.path.read_bytes()
    with serve(disk.path, workdir, "--tls-creds", str(tls_creds)) as s:
        plain = f"nbd+unix:///?socket={s.socket}"
        proc = run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4096", plain)
        assert proc.returncode != 0
        assert "TLS" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        proc = run_tool("nbdinfo", "--json", plain)
        assert proc.returncode != 0, proc.stdout
        # a client with the CA but no certificate of its own fails the (verify-peer) TLS handshake
        ca_only = workdir / "ca-only"
        ca_only.mkdir()
        (ca_only / "ca-cert.pem").write_bytes((tls_creds / "ca-cert.pem").read_bytes())
        proc = run_tool("nbdinfo", "--size", tls_uri(s, "", ca_only))
        assert proc.returncode != 0, proc.stdout
        # the server is unharmed: a proper TLS client still works
        assert s.running()
        assert check_tool("nbdinfo", "--size", tls_uri(s, "", tls_creds)).strip() == str(SIZE)
    assert disk.path.read_bytes() == before


def test_tls_no_verify_peer_accepts_clients_without_certificate(
    tls_creds: Path, disk: Image, workdir: Path
) -> None:
    ca_only = workdir / "ca-only"
    ca_only.mkdir()
    (ca_only / "ca-cert.pem").write_bytes((tls_creds / "ca-cert.pem").read_bytes())
    with serve(disk.path, workdir, "--tls-creds", str(tls_creds), "--no-verify-peer") as s:
        assert check_tool("nbdinfo", "--size", tls_uri(s, "", ca_only)).strip() == str(SIZE)
