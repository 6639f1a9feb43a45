"""The server's answers to each option of the handshake (spec: "Option types").

Each handler reads the option data and the connection's negotiation state and returns an
:class:`Outcome`: the reply bytes and what the state machine in :mod:`cowbackup.nbd.server` does next.
The handlers see the server only as an :class:`OptionContext`, what they use of it: the server imports
this module, never the reverse.
Handlers never raise for bad client input: malformed data is answered with NBD_REP_ERR_INVALID, and
what cannot be answered (a bad NBD_OPT_EXPORT_NAME) is an ``Outcome.error`` that ends the connection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cowbackup.nbd.constants import (
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_MAX_STRING_SIZE,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_BLOCK_SIZE_REQD,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    opt_name,
)
from cowbackup.nbd.exports import ExportInfo
from cowbackup.nbd.wire import (
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    U16,
    WireError,
    decode_info_request,
    decode_meta_context_request,
    decode_string,
    encode_rep_meta_context,
    encode_rep_server,
    encode_string,
    option_reply,
)

__all__ = ["Negotiation", "OptionContext", "Outcome", "handle"]


@dataclass
class Negotiation:
    """Option state that lives until STARTTLS resets it or transmission begins."""

    structured: bool = False
    #: canonical name of the export the last NBD_OPT_SET_META_CONTEXT was for, and what it selected
    meta_export: str | None = None
    meta_contexts: list[tuple[int, str]] = field(default_factory=list)


class OptionContext(Protocol):
    """What the option handlers use of the server connection: a
    :class:`~cowbackup.nbd.server.ServerProtocol` in the option phase."""

    #: changed by the handlers (NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT)
    negotiation: Negotiation

    @property
    def tls(self) -> str:
        """``off``, ``on`` or ``required``."""

    @property
    def tls_active(self) -> bool: ...
    @property
    def no_zeroes(self) -> bool: ...
    def lookup(self, name: str, /) -> ExportInfo | None: ...
    def list_exports(self) -> Sequence[ExportInfo]: ...
    def max_io(self, info: ExportInfo) -> int: ...


@dataclass
class Outcome:
    """What an option did: ``reply`` to send, then at most one of the other fields."""

    reply: bytes = b""
    #: the connection must end (no reply is possible); the ProtocolError message
    error: str | None = None
    abort: bool = False
    starttls: bool = False
    #: the export chosen by NBD_OPT_GO / NBD_OPT_EXPORT_NAME: transmission begins
    export: ExportInfo | None = None
    block_size_agreed: bool = False


def _error(option: int, reply_type: int, message: str) -> Outcome:
    text = message.encode()[:NBD_MAX_STRING_SIZE].decode(errors="ignore").encode()
    return Outcome(reply=option_reply(option, reply_type, text))


def _ack(option: int) -> bytes:
    return option_reply(option, NBD_REP_ACK)


def handle(server: OptionContext, option: int, data: bytes) -> Outcome:
    """Answer ``option`` with ``data`` (TLS policy for FORCEDTLS was applied by the caller)."""
    handler = _HANDLERS.get(option)
    if handler is None:
        return _error(option, NBD_REP_ERR_UNSUP, f"{opt_name(option)} is not supported")
    return handler(server, option, data)


def _export_name(server: OptionContext, option: int, data: bytes) -> Outcome:
    try:
        name = decode_string(data)
    except WireError as err:
        return Outcome(error=f"NBD_OPT_EXPORT_NAME: {err}")
    info = server.lookup(name)
    if info is None:
        return Outcome(error=f"NBD_OPT_EXPORT_NAME: export {name!r} not available")
    flags = info.transmission_flags(structured_replies=server.negotiation.structured)
    reply = EXPORT_NAME_REPLY.pack(info.size, flags)
    if not server.no_zeroes:
        reply += bytes(EXPORT_NAME_PADDING)
    return Outcome(reply=reply, export=info)


def _abort(server: OptionContext, option: int, data: bytes) -> Outcome:
    # The spec: the server SHOULD ignore data sent with NBD_OPT_ABORT.
    return Outcome(reply=_ack(option), abort=True)


def _list(server: OptionContext, option: int, data: bytes) -> Outcome:
    if data:
        return _error(option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
    parts = [
        option_reply(option, NBD_REP_SERVER, encode_rep_server(info.name, info.description))
        for info in server.list_exports()
    ]
    parts.append(_ack(option))
    return Outcome(reply=b"".join(parts))


def _starttls(server: OptionContext, option: int, data: bytes) -> Outcome:
    if server.tls == "off":
        return _error(option, NBD_REP_ERR_POLICY, "TLS is not enabled on this server")
    if data:
        return _error(option, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
    if server.tls_active:
        return _error(option, NBD_REP_ERR_INVALID, "TLS is already active")
    return Outcome(reply=_ack(option), starttls=True)


def _info_go(server: OptionContext, option: int, data: bytes) -> Outcome:
    try:
        name, requests = decode_info_request(data)
    except WireError as err:
        return _error(option, NBD_REP_ERR_INVALID, str(err))
    info = server.lookup(name)
    if info is None:
        return _error(option, NBD_REP_ERR_UNKNOWN, f"export {name!r} not available")
    flags = info.transmission_flags(structured_replies=server.negotiation.structured)
    infos = [INFO_EXPORT.pack(NBD_INFO_EXPORT, info.size, flags)]
    if NBD_INFO_NAME in requests:
        infos.append(U16.pack(NBD_INFO_NAME) + encode_string(info.name))
    if NBD_INFO_DESCRIPTION in requests and info.description:
        infos.append(U16.pack(NBD_INFO_DESCRIPTION) + encode_string(info.description))
    # Always sent: clients that did not ask must still be told, and it costs nothing.
    infos.append(
        INFO_BLOCK_SIZE.pack(
            NBD_INFO_BLOCK_SIZE, info.min_block_size, info.preferred_block_size, server.max_io(info)
        )
    )
    parts = [option_reply(option, NBD_REP_INFO, payload) for payload in infos]
    asked_block_size = NBD_INFO_BLOCK_SIZE in requests
    if info.block_size_required and not asked_block_size:
        message = b"request NBD_INFO_BLOCK_SIZE to use this export"
        parts.append(option_reply(option, NBD_REP_ERR_BLOCK_SIZE_REQD, message))
        return Outcome(reply=b"".join(parts))
    parts.append(_ack(option))
    if option == NBD_OPT_INFO:
        return Outcome(reply=b"".join(parts))
    return Outcome(reply=b"".join(parts), export=info, block_size_agreed=asked_block_size)


def _structured_reply(server: OptionContext, option: int, data: bytes) -> Outcome:
    if data:
        return _error(option, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
    if server.negotiation.structured:
        return _error(option, NBD_REP_ERR_INVALID, "structured replies are already negotiated")
    server.negotiation.structured = True
    return Outcome(reply=_ack(option))


def _meta_context(server: OptionContext, option: int, data: bytes) -> Outcome:
    neg = server.negotiation
    setting = option == NBD_OPT_SET_META_CONTEXT
    if setting:  # replaces the earlier selection, even when it fails
        neg.meta_export = None
        neg.meta_contexts = []
    if not neg.structured:
        return _error(option, NBD_REP_ERR_INVALID, "negotiate structured replies first")
    try:
        name, queries = decode_meta_context_request(data)
    except WireError as err:
        return _error(option, NBD_REP_ERR_INVALID, str(err))
    info = server.lookup(name)
    if info is None:
        return _error(option, NBD_REP_ERR_UNKNOWN, f"export {name!r} not available")
    registry = info.meta_contexts
    try:
        names = registry.select_contexts(queries) if setting else registry.list_contexts(queries)
    except ValueError as err:
        return _error(option, NBD_REP_ERR_INVALID, str(err))
    contexts = [(i + 1 if setting else 0, context) for i, context in enumerate(names)]
    if setting:
        neg.meta_export = info.name
        neg.meta_contexts = contexts
    parts = [option_reply(option, NBD_REP_META_CONTEXT, encode_rep_meta_context(*ctx)) for ctx in contexts]
    parts.append(_ack(option))
    return Outcome(reply=b"".join(parts))


_HANDLERS: dict[int, Callable[[OptionContext, int, bytes], Outcome]] = {
    NBD_OPT_EXPORT_NAME: _export_name,
    NBD_OPT_ABORT: _abort,
    NBD_OPT_LIST: _list,
    NBD_OPT_STARTTLS: _starttls,
    NBD_OPT_INFO: _info_go,
    NBD_OPT_GO: _info_go,
    NBD_OPT_STRUCTURED_REPLY: _structured_reply,
    NBD_OPT_LIST_META_CONTEXT: _meta_context,
    NBD_OPT_SET_META_CONTEXT: _meta_context,
    # NBD_OPT_EXTENDED_HEADERS, NBD_OPT_PEEK_EXPORT and unknown options: NBD_REP_ERR_UNSUP.
}
