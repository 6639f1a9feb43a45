"""Every constant of the NBD protocol, named exactly as the spec names it.

Spec: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md (section "Values" and the
message layouts above it).  Where the spec has no name for a value we use QEMU's (include/block/nbd.h)
and say so.  Values are plain ``int`` so they can go straight into :mod:`struct`.

Besides the values this module has the helpers that name them for logs (``opt_name(NBD_OPT_GO)`` ->
``"NBD_OPT_GO"``, ``flag_names(0x0d, TRANSMISSION_FLAG_NAMES)`` -> ``"NBD_FLAG_HAS_FLAGS|..."``) and the
mapping between Linux ``errno`` values and NBD error values (:func:`errno_to_nbd`, :func:`nbd_to_errno`),
as QEMU maps them (nbd/common.c, nbd/server.c ``system_errno_to_nbd_errno``).
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping

# -- magic numbers (spec: "Newstyle negotiation", "Request message", "Simple reply message", ...) --------

#: ASCII "NBDMAGIC": the first 8 bytes the server sends (also known as ``INIT_PASSWD``).
NBDMAGIC = 0x4E42444D41474943
INIT_PASSWD = NBDMAGIC
#: ASCII "IHAVEOPT": the newstyle greeting's second magic, and the magic of every option request.
IHAVEOPT = 0x49484156454F5054
#: The oldstyle greeting's second magic (``cliserv_magic``); we never speak oldstyle.
CLISERV_MAGIC = 0x00420281861253
#: Magic of every option reply (the spec has no name for it; QEMU calls it NBD_REP_MAGIC).
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_EXTENDED_REQUEST_MAGIC = 0x21E41C71
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
NBD_EXTENDED_REPLY_MAGIC = 0x6E8A278C

#: The IANA port for NBD.
NBD_DEFAULT_PORT = 10809
#: Longest string (export name, description, error message, context name) the spec allows, in bytes.
NBD_MAX_STRING_SIZE = 4096

# -- handshake flags (server, 16 bits) -----------------------------------------------------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1

# -- client flags (32 bits) ----------------------------------------------------------------------------
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# -- transmission flags (16 bits) ----------------------------------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11
NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

# -- option types --------------------------------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# -- option reply types --------------------------------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
#: Bit 31 marks an error reply (the spec: "all of which are denoted by having bit 31 set").
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10

# -- information types of NBD_REP_INFO (and of the information requests of NBD_OPT_INFO / NBD_OPT_GO) ---
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# -- command flags (16 bits) ---------------------------------------------------------------------------
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5

# -- request types -------------------------------------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

# -- structured reply flags and types ------------------------------------------------------------------
NBD_REPLY_FLAG_DONE = 1 << 0
#: Bit 15 marks an error chunk type (the spec: "All error chunk types have bit 15 set"; QEMU NBD_REPLY_ERR).
NBD_REPLY_TYPE_FLAG_ERROR = 1 << 15
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6
NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_FLAG_ERROR | 1
NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_FLAG_ERROR | 2

# -- block status flags --------------------------------------------------------------------------------
#: ``base:allocation``: the extent is a hole (unallocated).
NBD_STATE_HOLE = 1 << 0
#: ``base:allocation``: the extent reads as zeroes.
NBD_STATE_ZERO = 1 << 1
#: ``qemu:dirty-bitmap:NAME``: the extent is dirty in the bitmap (QEMU docs/interop/nbd.txt).
NBD_STATE_DIRTY = 1 << 0

# -- metadata context names ----------------------------------------------------------------------------
BASE_ALLOCATION = "base:allocation"
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# -- error values (spec: "Error values") ---------------------------------------------------------------
NBD_SUCCESS = 0  # QEMU's name; the spec just says "MAY be zero"
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

#: Every error value the spec defines.
NBD_ERRORS: frozenset[int] = frozenset(
    {NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN}
)

# -- derived tables ------------------------------------------------------------------------------------

#: The command flags the spec documents for each command ("Command flags"); NBD_CMD_FLAG_FUA is valid on
#: every command once NBD_FLAG_SEND_FUA is advertised, NBD_CMD_FLAG_PAYLOAD_LEN only with extended headers.
COMMAND_FLAGS_ALLOWED: dict[int, int] = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_DISC: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_CACHE: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_BLOCK_STATUS: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
}
#: Commands a client may only send when the export advertises the transmission flag.
COMMAND_NEEDS_FLAG: dict[int, int] = {
    NBD_CMD_FLUSH: NBD_FLAG_SEND_FLUSH,
    NBD_CMD_TRIM: NBD_FLAG_SEND_TRIM,
    NBD_CMD_WRITE_ZEROES: NBD_FLAG_SEND_WRITE_ZEROES,
}

# -- naming helpers ------------------------------------------------------------------------------------


def _table(*names: str) -> dict[int, str]:
    values = globals()
    return {values[name]: name for name in names}


#: value -> name tables, one per namespace (flag namespaces share bit values, so each has its own).
OPTION_NAMES: Mapping[int, str] = _table(
    "NBD_OPT_EXPORT_NAME",
    "NBD_OPT_ABORT",
    "NBD_OPT_LIST",
    "NBD_OPT_PEEK_EXPORT",
    "NBD_OPT_STARTTLS",
    "NBD_OPT_INFO",
    "NBD_OPT_GO",
    "NBD_OPT_STRUCTURED_REPLY",
    "NBD_OPT_LIST_META_CONTEXT",
    "NBD_OPT_SET_META_CONTEXT",
    "NBD_OPT_EXTENDED_HEADERS",
)
REPLY_NAMES: Mapping[int, str] = _table(
    "NBD_REP_ACK",
    "NBD_REP_SERVER",
    "NBD_REP_INFO",
    "NBD_REP_META_CONTEXT",
    "NBD_REP_ERR_UNSUP",
    "NBD_REP_ERR_POLICY",
    "NBD_REP_ERR_INVALID",
    "NBD_REP_ERR_PLATFORM",
    "NBD_REP_ERR_TLS_REQD",
    "NBD_REP_ERR_UNKNOWN",
    "NBD_REP_ERR_SHUTDOWN",
    "NBD_REP_ERR_BLOCK_SIZE_REQD",
    "NBD_REP_ERR_TOO_BIG",
    "NBD_REP_ERR_EXT_HEADER_REQD",
)
INFO_NAMES: Mapping[int, str] = _table(
    "NBD_INFO_EXPORT", "NBD_INFO_NAME", "NBD_INFO_DESCRIPTION", "NBD_INFO_BLOCK_SIZE"
)
COMMAND_NAMES: Mapping[int, str] = _table(
    "NBD_CMD_READ",
    "NBD_CMD_WRITE",
    "NBD_CMD_DISC",
    "NBD_CMD_FLUSH",
    "NBD_CMD_TRIM",
    "NBD_CMD_CACHE",
    "NBD_CMD_WRITE_ZEROES",
    "NBD_CMD_BLOCK_STATUS",
    "NBD_CMD_RESIZE",
)
REPLY_TYPE_NAMES: Mapping[int, str] = _table(
    "NBD_REPLY_TYPE_NONE",
    "NBD_REPLY_TYPE_OFFSET_DATA",
    "NBD_REPLY_TYPE_OFFSET_HOLE",
    "NBD_REPLY_TYPE_BLOCK_STATUS",
    "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
    "NBD_REPLY_TYPE_ERROR",
    "NBD_REPLY_TYPE_ERROR_OFFSET",
)
ERROR_NAMES: Mapping[int, str] = _table(
    "NBD_EPERM",
    "NBD_EIO",
    "NBD_ENOMEM",
    "NBD_EINVAL",
    "NBD_ENOSPC",
    "NBD_EOVERFLOW",
    "NBD_ENOTSUP",
    "NBD_ESHUTDOWN",
)
HANDSHAKE_FLAG_NAMES: Mapping[int, str] = _table("NBD_FLAG_FIXED_NEWSTYLE", "NBD_FLAG_NO_ZEROES")
CLIENT_FLAG_NAMES: Mapping[int, str] = _table("NBD_FLAG_C_FIXED_NEWSTYLE", "NBD_FLAG_C_NO_ZEROES")
TRANSMISSION_FLAG_NAMES: Mapping[int, str] = _table(
    "NBD_FLAG_HAS_FLAGS",
    "NBD_FLAG_READ_ONLY",
    "NBD_FLAG_SEND_FLUSH",
    "NBD_FLAG_SEND_FUA",
    "NBD_FLAG_ROTATIONAL",
    "NBD_FLAG_SEND_TRIM",
    "NBD_FLAG_SEND_WRITE_ZEROES",
    "NBD_FLAG_SEND_DF",
    "NBD_FLAG_CAN_MULTI_CONN",
    "NBD_FLAG_SEND_RESIZE",
    "NBD_FLAG_SEND_CACHE",
    "NBD_FLAG_SEND_FAST_ZERO",
    "NBD_FLAG_BLOCK_STAT_PAYLOAD",
)
COMMAND_FLAG_NAMES: Mapping[int, str] = _table(
    "NBD_CMD_FLAG_FUA",
    "NBD_CMD_FLAG_NO_HOLE",
    "NBD_CMD_FLAG_DF",
    "NBD_CMD_FLAG_REQ_ONE",
    "NBD_CMD_FLAG_FAST_ZERO",
    "NBD_CMD_FLAG_PAYLOAD_LEN",
)
REPLY_FLAG_NAMES: Mapping[int, str] = _table("NBD_REPLY_FLAG_DONE")


def _name(table: Mapping[int, str], value: int) -> str:
    return table.get(value, f"unknown({value:#x})")


def opt_name(value: int) -> str:
    """``NBD_OPT_*`` name of an option, or ``unknown(0x..)``."""
    return _name(OPTION_NAMES, value)


def rep_name(value: int) -> str:
    """``NBD_REP_*`` name of an option reply type, or ``unknown(0x..)``."""
    return _name(REPLY_NAMES, value)


def info_name(value: int) -> str:
    """``NBD_INFO_*`` name of an information type, or ``unknown(0x..)``."""
    return _name(INFO_NAMES, value)


def cmd_name(value: int) -> str:
    """``NBD_CMD_*`` name of a request type, or ``unknown(0x..)``."""
    return _name(COMMAND_NAMES, value)


def reply_type_name(value: int) -> str:
    """``NBD_REPLY_TYPE_*`` name of a structured reply chunk type, or ``unknown(0x..)``."""
    return _name(REPLY_TYPE_NAMES, value)


def error_name(value: int) -> str:
    """``NBD_E*`` name of an error value (``NBD_SUCCESS`` for 0), or ``unknown(N)``."""
    if value == NBD_SUCCESS:
        return "NBD_SUCCESS"
    return ERROR_NAMES.get(value, f"unknown({value})")


def flag_names(value: int, table: Mapping[int, str]) -> str:
    """Name every set bit of ``value`` from ``table``, joined by ``|``; unknown bits as hex; ``0`` if none.

    >>> flag_names(NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | 0x8000, TRANSMISSION_FLAG_NAMES)
    'NBD_FLAG_HAS_FLAGS|NBD_FLAG_READ_ONLY|0x8000'
    """
    parts = [name for bit, name in sorted(table.items()) if value & bit]
    rest = value & ~sum(table)
    if rest:
        parts.append(f"{rest:#x}")
    return "|".join(parts) or "0"


# -- errno mapping (QEMU nbd/server.c system_errno_to_nbd_errno, nbd/client.c nbd_errno_to_system_errno) -

_ERRNO_TO_NBD: dict[int, int] = {
    0: NBD_SUCCESS,
    _errno.EPERM: NBD_EPERM,
    _errno.EROFS: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.ENOSPC: NBD_ENOSPC,
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP,
    _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
    _errno.EINVAL: NBD_EINVAL,
}

_NBD_TO_ERRNO: dict[int, int] = {
    NBD_SUCCESS: 0,
    NBD_EPERM: _errno.EPERM,
    NBD_EIO: _errno.EIO,
    NBD_ENOMEM: _errno.ENOMEM,
    NBD_EINVAL: _errno.EINVAL,
    NBD_ENOSPC: _errno.ENOSPC,
    NBD_EOVERFLOW: _errno.EOVERFLOW,
    NBD_ENOTSUP: _errno.ENOTSUP,
    NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}


def errno_to_nbd(err: int) -> int:
    """Map a system ``errno`` to the NBD error value a server sends.

    EPERM/EROFS -> NBD_EPERM; EIO; ENOMEM; ENOSPC/EDQUOT/EFBIG -> NBD_ENOSPC; EOVERFLOW;
    ENOTSUP/EOPNOTSUPP -> NBD_ENOTSUP; ESHUTDOWN; 0 -> 0; everything else -> NBD_EINVAL (as QEMU).
    """
    return _ERRNO_TO_NBD.get(err, NBD_EINVAL)


def nbd_to_errno(error: int) -> int:
    """Map an NBD error value received from a server to a system ``errno``.

    Unknown values become ``EINVAL``, as the spec asks ("treat an unexpected error value as if it had
    been NBD_EINVAL").
    """
    return _NBD_TO_ERRNO.get(error, _errno.EINVAL)
