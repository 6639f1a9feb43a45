"""What the protocol core needs to know about one export: :class:`ExportInfo`.

The server's configuration owns the exports; the core sees them only through the read-only view it is
given (``lookup(name)`` and ``list_exports()``), one :class:`ExportInfo` per export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cowbackup.nbd.constants import (
    NBD_FLAG_BLOCK_STAT_PAYLOAD,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_DF,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_RESIZE,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_MAX_STRING_SIZE,
)
from cowbackup.nbd.meta import MetaContextRegistry

__all__ = ["DEFAULT_MAX_PAYLOAD", "NO_BLOCK_LIMIT", "ExportInfo"]

#: The spec's "effectively unlimited" maximum block size.
NO_BLOCK_LIMIT = 0xFFFFFFFF
#: Largest READ/WRITE payload a server handles by default (the spec: lengths below 2^25 are never a DoS).
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024

#: Transmission flags the core decides itself from the negotiation; an ExportInfo's ``flags`` may not set
#: them (SEND_DF is set whenever structured replies are negotiated; we negotiate no resize or extended
#: headers).  NBD_FLAG_HAS_FLAGS is always added.
_CORE_FLAGS = NBD_FLAG_SEND_DF | NBD_FLAG_SEND_RESIZE | NBD_FLAG_BLOCK_STAT_PAYLOAD


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class ExportInfo:
    """One export as the protocol core sees it.

    ``flags`` are the transmission flags that describe the export (``NBD_FLAG_READ_ONLY``,
    ``NBD_FLAG_SEND_FLUSH``, ``NBD_FLAG_SEND_FUA``, ``NBD_FLAG_SEND_TRIM``, ``NBD_FLAG_SEND_WRITE_ZEROES``,
    ``NBD_FLAG_SEND_FAST_ZERO``, ``NBD_FLAG_CAN_MULTI_CONN``, ``NBD_FLAG_SEND_CACHE``,
    ``NBD_FLAG_ROTATIONAL``).  Block sizes follow the spec's "Block size constraints";
    ``block_size_required`` makes NBD_OPT_GO / NBD_OPT_INFO without an NBD_INFO_BLOCK_SIZE request fail
    with NBD_REP_ERR_BLOCK_SIZE_REQD (off by default: the spec asks servers not to insist).
    ``meta_contexts`` are the metadata contexts offered for NBD_CMD_BLOCK_STATUS.

    Raises ``ValueError`` for values the spec forbids.
    """

    name: str
    size: int
    flags: int = 0
    description: str = ""
    min_block_size: int = 1
    preferred_block_size: int = 4096
    max_block_size: int = DEFAULT_MAX_PAYLOAD
    block_size_required: bool = False
    meta_contexts: MetaContextRegistry = field(default_factory=MetaContextRegistry.base, compare=False)

    def __post_init__(self) -> None:
        for what, text in (("name", self.name), ("description", self.description)):
            raw = text.encode()
            if len(raw) > NBD_MAX_STRING_SIZE or b"\0" in raw:
                raise ValueError(f"export {what} is not a valid NBD string: {text[:64]!r}")
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size {self.size} out of range")
        if self.flags & ~0xFFFF or self.flags & _CORE_FLAGS:
            raise ValueError(f"transmission flags {self.flags:#x} not allowed in an ExportInfo")
        if self.flags & NBD_FLAG_SEND_FAST_ZERO and not self.flags & NBD_FLAG_SEND_WRITE_ZEROES:
            raise ValueError("NBD_FLAG_SEND_FAST_ZERO needs NBD_FLAG_SEND_WRITE_ZEROES")
        if not _power_of_two(self.min_block_size) or self.min_block_size > 65536:
            raise ValueError(f"minimum block size {self.min_block_size} must be a power of 2 <= 65536")
        if not _power_of_two(self.preferred_block_size) or self.preferred_block_size < max(
            self.min_block_size, 512
        ):
            raise ValueError(f"preferred block size {self.preferred_block_size} is invalid")
        if self.max_block_size != NO_BLOCK_LIMIT and (
            self.max_block_size % self.min_block_size
            or self.max_block_size < min(self.preferred_block_size, self.size)
            or self.max_block_size > NO_BLOCK_LIMIT
        ):
            raise ValueError(f"maximum block size {self.max_block_size} is invalid")

    @property
    def read_only(self) -> bool:
        return bool(self.flags & NBD_FLAG_READ_ONLY)

    def transmission_flags(self, *, structured_replies: bool) -> int:
        """The 16-bit transmission flags sent to the client for this negotiation."""
        flags = self.flags | NBD_FLAG_HAS_FLAGS
        if structured_replies:
            flags |= NBD_FLAG_SEND_DF
        return flags
