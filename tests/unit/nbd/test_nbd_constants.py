"""Constants, naming helpers, errno mapping, wire codecs, ExportInfo, the metadata context registry."""

from __future__ import annotations

import errno

import pytest

from cowbackup.nbd import constants as c
from cowbackup.nbd import wire
from cowbackup.nbd.errors import NBDError, OptionError, ProtocolError, RequestError, StateError
from cowbackup.nbd.exports import ExportInfo
from cowbackup.nbd.meta import MetaContextRegistry, exact_names

# -- constants -----------------------------------------------------------------------------------------


def test_magic_numbers_spell_what_the_spec_says() -> None:
    assert c.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert c.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert c.NBD_REP_MAGIC == 0x3E889045565A9
    assert (c.NBD_REQUEST_MAGIC, c.NBD_SIMPLE_REPLY_MAGIC) == (0x25609513, 0x67446698)
    assert (c.NBD_STRUCTURED_REPLY_MAGIC, c.NBD_EXTENDED_REQUEST_MAGIC) == (0x668E33EF, 0x21E41C71)


def test_values_from_the_spec() -> None:
    assert (c.NBD_OPT_GO, c.NBD_OPT_SET_META_CONTEXT, c.NBD_OPT_EXTENDED_HEADERS) == (7, 10, 11)
    assert c.NBD_REP_ERR_BLOCK_SIZE_REQD == 2**31 + 8
    assert (c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_FAST_ZERO, c.NBD_FLAG_SEND_FAST_ZERO) == (7, 16, 1 << 11)
    assert (c.NBD_REPLY_TYPE_ERROR, c.NBD_REPLY_TYPE_ERROR_OFFSET) == (2**15 + 1, 2**15 + 2)
    assert (c.NBD_EINVAL, c.NBD_EOVERFLOW, c.NBD_ESHUTDOWN) == (22, 75, 108)
    assert (c.NBD_STATE_HOLE, c.NBD_STATE_ZERO, c.NBD_STATE_DIRTY) == (1, 2, 1)


def test_names_for_logs() -> None:
    assert c.opt_name(c.NBD_OPT_GO) == "NBD_OPT_GO"
    assert c.opt_name(99) == "unknown(0x63)"
    assert c.rep_name(c.NBD_REP_ERR_TLS_REQD) == "NBD_REP_ERR_TLS_REQD"
    assert c.cmd_name(c.NBD_CMD_WRITE_ZEROES) == "NBD_CMD_WRITE_ZEROES"
    assert c.reply_type_name(c.NBD_REPLY_TYPE_OFFSET_HOLE) == "NBD_REPLY_TYPE_OFFSET_HOLE"
    assert c.info_name(c.NBD_INFO_BLOCK_SIZE) == "NBD_INFO_BLOCK_SIZE"
    assert (c.error_name(0), c.error_name(c.NBD_ENOSPC), c.error_name(7)) == (
        "NBD_SUCCESS",
        "NBD_ENOSPC",
        "unknown(7)",
    )
    flags = c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_READ_ONLY | 0x8000
    assert c.flag_names(flags, c.TRANSMISSION_FLAG_NAMES) == "NBD_FLAG_HAS_FLAGS|NBD_FLAG_READ_ONLY|0x8000"
    assert c.flag_names(1, c.HANDSHAKE_FLAG_NAMES) == "NBD_FLAG_FIXED_NEWSTYLE"
    assert c.flag_names(0, c.COMMAND_FLAG_NAMES) == "0"


@pytest.mark.parametrize(
    ("err", "nbd"),
    [
        (0, 0),
        (errno.EPERM, c.NBD_EPERM),
        (errno.EROFS, c.NBD_EPERM),
        (errno.EIO, c.NBD_EIO),
        (errno.ENOMEM, c.NBD_ENOMEM),
        (errno.ENOSPC, c.NBD_ENOSPC),
        (errno.EDQUOT, c.NBD_ENOSPC),
        (errno.EFBIG, c.NBD_ENOSPC),
        (errno.EOVERFLOW, c.NBD_EOVERFLOW),
        (errno.ENOTSUP, c.NBD_ENOTSUP),
        (errno.EOPNOTSUPP, c.NBD_ENOTSUP),
        (errno.ESHUTDOWN, c.NBD_ESHUTDOWN),
        (errno.EINVAL, c.NBD_EINVAL),
        (errno.ENOENT, c.NBD_EINVAL),
        (errno.EBADF, c.NBD_EINVAL),
    ],
)
def test_errno_to_nbd_as_qemu(err: int, nbd: int) -> None:
    assert c.errno_to_nbd(err) == nbd


def test_nbd_to_errno_round_trips_and_defaults_to_einval() -> None:
    for value in c.NBD_ERRORS:
        assert c.errno_to_nbd(c.nbd_to_errno(value)) == value
    assert c.nbd_to_errno(0) == 0
    assert c.nbd_to_errno(12345) == errno.EINVAL


# -- errors --------------------------------------------------------------------------------------------


def test_error_tree_and_values() -> None:
    for cls in (ProtocolError, OptionError, RequestError, StateError):
        assert issubclass(cls, NBDError)
    err = RequestError(c.NBD_ENOSPC, "disk full")
    assert isinstance(err, OSError)
    assert (err.errno, err.strerror, err.nbd_error) == (errno.ENOSPC, "disk full", c.NBD_ENOSPC)
    assert RequestError(c.NBD_EIO).strerror == "Input/output error"
    assert ProtocolError("x") == ProtocolError("x") != ProtocolError("y")
    assert len({ProtocolError("x"), ProtocolError("x")}) == 1
    opt = OptionError(c.NBD_OPT_GO, c.NBD_REP_ERR_UNKNOWN, "no such export")
    assert str(opt) == "NBD_OPT_GO failed: NBD_REP_ERR_UNKNOWN: no such export"
    with pytest.raises(NBDError):
        raise opt


# -- wire ----------------------------------------------------------------------------------------------


def test_struct_sizes_match_the_spec() -> None:
    assert wire.GREETING.size == 18
    assert wire.OPTION_HEADER.size == 16
    assert wire.OPTION_REPLY_HEADER.size == 20
    assert wire.REQUEST.size == 28
    assert wire.EXTENDED_REQUEST.size == 32
    assert wire.SIMPLE_REPLY.size == 16
    assert wire.STRUCTURED_REPLY.size == 20
    assert wire.EXTENDED_REPLY.size == 32
    assert (wire.INFO_EXPORT.size, wire.INFO_BLOCK_SIZE.size) == (12, 14)
    assert (wire.OFFSET_HOLE.size, wire.BLOCK_DESCRIPTOR.size, wire.ERROR.size) == (12, 8, 6)


def test_info_request_round_trip_and_errors() -> None:
    data = wire.encode_info_request("disk", [c.NBD_INFO_NAME, c.NBD_INFO_BLOCK_SIZE])
    assert wire.decode_info_request(data) == ("disk", [1, 3])
    with pytest.raises(wire.WireError):
        wire.decode_info_request(data[:-1])
    with pytest.raises(wire.WireError):
        wire.decode_info_request(data + b"x")
    with pytest.raises(wire.WireError):
        wire.decode_info_request(b"\xff\xff\xff\xff")


def test_meta_context_request_round_trip_and_errors() -> None:
    data = wire.encode_meta_context_request("disk", ["base:allocation", "qemu:"])
    assert wire.decode_meta_context_request(data) == ("disk", ["base:allocation", "qemu:"])
    huge_count = wire.U32.pack(0) + wire.U32.pack(0xFFFFFFFF)
    with pytest.raises(wire.WireError):
        wire.decode_meta_context_request(huge_count)
    with pytest.raises(wire.WireError):
        wire.decode_meta_context_request(wire.U32.pack(2) + b"\xff\xfe" + wire.U32.pack(0))


def test_strings() -> None:
    with pytest.raises(ValueError, match="not a valid NBD string"):
        wire.encode_string("a\0b")
    with pytest.raises(ValueError, match="not a valid NBD string"):
        wire.encode_string("x" * 4097)
    with pytest.raises(wire.WireError):
        wire.decode_string(b"x" * 4097)
    with pytest.raises(wire.WireError):
        wire.decode_string(b"a\0")
    assert wire.decode_message(b"caf\xc3") == "caf\ufffd"
    assert wire.decode_rep_server(wire.encode_rep_server("d", "desc")) == ("d", "desc")
    assert wire.decode_rep_meta_context(wire.encode_rep_meta_context(7, "base:allocation")) == (
        7,
        "base:allocation",
    )


# -- exports -------------------------------------------------------------------------------------------


def test_export_info_validation() -> None:
    ExportInfo("ok", 0)
    with pytest.raises(ValueError, match="power of 2"):
        ExportInfo("x", 4096, min_block_size=3)
    with pytest.raises(ValueError, match="preferred"):
        ExportInfo("x", 4096, min_block_size=4096, preferred_block_size=512)
    with pytest.raises(ValueError, match="maximum"):
        ExportInfo("x", 4096, min_block_size=512, max_block_size=1000)
    with pytest.raises(ValueError, match="not allowed"):
        ExportInfo("x", 4096, flags=c.NBD_FLAG_SEND_DF)
    with pytest.raises(ValueError, match="FAST_ZERO"):
        ExportInfo("x", 4096, flags=c.NBD_FLAG_SEND_FAST_ZERO)
    with pytest.raises(ValueError, match="name"):
        ExportInfo("a\0", 4096)
    with pytest.raises(ValueError, match="size"):
        ExportInfo("x", -1)
    info = ExportInfo("x", 4096, flags=c.NBD_FLAG_READ_ONLY)
    assert info.read_only
    assert info.transmission_flags(structured_replies=False) == c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_READ_ONLY
    assert info.transmission_flags(structured_replies=True) & c.NBD_FLAG_SEND_DF


# -- metadata contexts ---------------------------------------------------------------------------------


def qemu_registry(bitmaps: list[str]) -> MetaContextRegistry:
    registry = MetaContextRegistry.base()
    registry.register(
        "qemu",
        exact_names(lambda: ["qemu:allocation-depth", *(f"qemu:dirty-bitmap:{b}" for b in bitmaps)]),
    )
    return registry


def test_registry_base_allocation() -> None:
    registry = MetaContextRegistry.base()
    assert registry.list_contexts([]) == ["base:allocation"]
    assert registry.list_contexts(["base:"]) == ["base:allocation"]
    assert registry.select_contexts(["base:"]) == []
    assert registry.select_contexts(["base:allocation", "base:allocation"]) == ["base:allocation"]
    assert registry.select_contexts(["base:other", "x-unknown:thing"]) == []
    with pytest.raises(ValueError, match="namespace"):
        registry.select_contexts(["no-colon"])
    with pytest.raises(ValueError, match="namespace"):
        registry.list_contexts([":leaf"])


def test_registry_qemu_namespace_plugs_in() -> None:
    bitmaps = ["b0"]
    registry = qemu_registry(bitmaps)
    bitmaps.append("b1")  # names are read at query time
    assert registry.list_contexts(["qemu:dirty-bitmap:"]) == ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    assert registry.list_contexts(["qemu:"]) == [
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b0",
        "qemu:dirty-bitmap:b1",
    ]
    assert registry.list_contexts([]) == ["base:allocation", *registry.list_contexts(["qemu:"])]
    assert registry.select_contexts(["qemu:dirty-bitmap:"]) == []
    assert registry.select_contexts(["qemu:dirty-bitmap:b1", "base:allocation"]) == [
        "qemu:dirty-bitmap:b1",
        "base:allocation",
    ]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("qemu", exact_names(list))
    with pytest.raises(ValueError, match="invalid"):
        registry.register("bad name", exact_names(list))
    registry.unregister("qemu")
    assert registry.namespaces == ["base"]


def test_registry_drops_names_outside_the_namespace_or_too_long() -> None:
    registry = MetaContextRegistry()
    registry.register("x-a", exact_names(lambda: ["x-b:stolen", "x-a:" + "n" * 5000, "x-a:ok"]))
    assert registry.list_contexts([]) == ["x-a:ok"]
