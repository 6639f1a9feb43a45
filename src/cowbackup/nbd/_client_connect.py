"""Connecting an :class:`~cowbackup.nbd.client_conn.NBDClient`: the socket, TLS and the handshake.

::

    negotiate(address) -> socket -> [NBD_OPT_STARTTLS -> TLS handshake] -> go(export) -> ExportReady

:func:`negotiate` runs these steps under one deadline and hands back the open streams, the protocol
core in its transmission phase and the export it selected; any failure is a :class:`ConnectError` and
leaves nothing open.  The handshake's own state lives in :class:`_Handshake` only while it runs.
:func:`close_socket` shuts the socket down, at once or (on ``close()``) gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from dataclasses import dataclass
from typing import NoReturn

from cowbackup.nbd.client import ClientProtocol
from cowbackup.nbd.constants import (
    BASE_ALLOCATION,
    NBD_OPT_STARTTLS,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNKNOWN,
    rep_name,
)
from cowbackup.nbd.errors import NBDError, OptionError, ProtocolError
from cowbackup.nbd.events import (
    ConnectionClosed,
    Disconnect,
    ExportReady,
    Greeting,
    NeedData,
    SendData,
    StartTLS,
)
from cowbackup.nbd.tls import TLSError, client_context
from cowbackup.nbd.uri import NBDAddress

#: How much to read from the socket at a time, and the stream's buffer limit.
READ_SIZE = 256 * 1024
STREAM_LIMIT = 1024 * 1024
#: How long close() waits for the socket (and TLS) to shut down before aborting it.
SHUTDOWN_TIMEOUT = 5.0

_CONNECTION_IDS = itertools.count(1)


class ConnectError(NBDError):
    """Connecting to ``address`` or negotiating the export failed; ``reason`` says why."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(address, reason)
        self.address = address
        self.reason = reason

    def __str__(self) -> str:
        return f"Could not connect to '{self.address}': {self.reason}"


@dataclass(frozen=True, slots=True)
class Negotiated:
    """A connection whose handshake is done: ready for the transmission phase."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: The protocol core, now in its transmission phase.
    proto: ClientProtocol
    export: ExportReady
    #: This connection's logger, a numbered child of the ``parent_log`` given to :func:`negotiate`.
    log: logging.Logger


async def negotiate(
    address: NBDAddress,
    *,
    tls_hostname: str | None,
    connect_timeout: float,
    parent_log: logging.Logger,
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,),
) -> Negotiated:
    """Connect to ``address`` and negotiate its export: the first half of ``NBDClient.connect()``.

    That method's docstring says when TLS is used, how the server's certificate is checked, and
    what raises :class:`ConnectError`; nothing stays open then.
    """
    name = address.to_uri()
    use_tls = address.tls or address.tls_certificates is not None
    try:
        ctx = tls_context(address, tls_hostname) if use_tls else None
    except TLSError as err:
        raise ConnectError(name, str(err)) from err
    client_log = parent_log.getChild(f"{next(_CONNECTION_IDS)}")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(connect_timeout):
            if address.socket is not None:
                reader, writer = await asyncio.open_unix_connection(address.socket, limit=STREAM_LIMIT)
            else:
                host = address.host or "localhost"
                reader, writer = await asyncio.open_connection(host, address.port, limit=STREAM_LIMIT)
            proto = ClientProtocol(logger=client_log)
            handshake = _Handshake(
                address, reader, writer, proto, logger=client_log, meta_contexts=meta_contexts
            )
            server_hostname = tls_hostname or (address.host if address.socket is None else None)
            export = await handshake.run(ctx, server_hostname)
    except ConnectError:
        await close_socket(writer)
        raise
    except TimeoutError as err:
        await close_socket(writer)
        raise ConnectError(name, f"no answer within {connect_timeout:g} s") from err
    except ssl.SSLError as err:
        await close_socket(writer)
        why = getattr(err, "verify_message", None) or err.reason or str(err)
        raise ConnectError(name, f"TLS handshake failed: {why}") from err
    except (OSError, EOFError) as err:
        await close_socket(writer)
        raise ConnectError(name, getattr(err, "strerror", None) or str(err) or type(err).__name__) from err
    except NBDError as err:  # a StateError: the core and this shell disagree (a bug)
        await close_socket(writer)
        raise ConnectError(name, f"internal error: {type(err).__name__}: {err}") from err
    except BaseException:
        await close_socket(writer)
        raise
    return Negotiated(reader, writer, proto, export, client_log)


def tls_context(address: NBDAddress, tls_hostname: str | None) -> ssl.SSLContext:
    """The client's TLS context for ``address``; :class:`~cowbackup.nbd.tls.TLSError` if it has none."""
    if not address.tls_certificates:
        raise TLSError("TLS needs a credentials directory (tls-creds, or ?tls-certificates=DIR)")
    check = tls_hostname is not None or address.socket is None
    return client_context(address.tls_certificates, hostname_check=check, verify_peer=address.tls_verify_peer)


class _Handshake:
    """One connection's negotiation, from the server's greeting to its :class:`ExportReady`."""

    def __init__(
        self,
        address: NBDAddress,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        proto: ClientProtocol,
        *,
        logger: logging.Logger,
        meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,),
    ) -> None:
        self.address = address
        self._meta_contexts = meta_contexts
        self.name = address.to_uri()
        self._reader = reader
        self._writer = writer
        self._proto = proto
        self._log = logger

    async def run(self, ctx: ssl.SSLContext | None, server_hostname: str | None) -> ExportReady:
        """Run the handshake to ExportReady; ConnectError for anything else."""
        proto = self._proto
        export = self.address.export
        while True:
            event = proto.next_event()
            if isinstance(event, NeedData):
                proto.receive_data(await self._reader.read(READ_SIZE))
            elif isinstance(event, SendData):
                self._writer.write(event.data)
            elif isinstance(event, Greeting):
                if ctx is not None:
                    if not event.fixed_newstyle:
                        self._fail_connect("the server does not support TLS (not a fixed newstyle server)")
                    self._writer.write(proto.opt_starttls())
                else:
                    self._writer.write(self._go(export))
            elif isinstance(event, StartTLS):
                assert ctx is not None
                await self._writer.drain()
                await self._writer.start_tls(ctx, server_hostname=server_hostname)
                proto.tls_started()
                self._log.debug("TLS established")
                self._writer.write(self._go(export))
            elif isinstance(event, ExportReady):
                await self._writer.drain()
                return event
            elif isinstance(event, OptionError):
                await self._send_abort()
                self._fail_connect(self._option_reason(event), event)
            elif isinstance(event, ProtocolError):
                self._fail_connect(f"NBD protocol error: {event}", event)
            elif isinstance(event, Disconnect | ConnectionClosed):
                self._fail_connect("the server closed the connection during the handshake")
            else:
                self._fail_connect(f"unexpected {type(event).__name__} during the handshake")
            await self._writer.drain()

    def _go(self, export: str) -> bytes:
        try:
            return self._proto.go(export, meta_contexts=self._meta_contexts)
        except ValueError as err:  # export name too long or not UTF-8
            self._fail_connect(f"invalid export name: {err}", err)

    def _option_reason(self, error: OptionError) -> str:
        export = self.address.export
        server_says = f" ({error.message})" if error.message else ""
        if error.option == NBD_OPT_STARTTLS:
            return f"the server does not support TLS: {rep_name(error.reply_type)}{server_says}"
        if error.reply_type == NBD_REP_ERR_TLS_REQD:
            return f"the server requires TLS (give tls-creds, or use an nbds:// URI){server_says}"
        if error.reply_type == NBD_REP_ERR_UNKNOWN:
            return f"export '{export}' not found on the server{server_says}"
        return f"export '{export}' refused: {error}"

    async def _send_abort(self) -> None:
        """NBD_OPT_ABORT after a refused option, so the server sees a polite goodbye (best effort)."""
        with contextlib.suppress(NBDError, OSError, ValueError):
            self._writer.write(self._proto.opt_abort())
            await self._writer.drain()

    def _fail_connect(self, reason: str, cause: BaseException | None = None) -> NoReturn:
        raise ConnectError(self.name, reason) from cause


async def close_socket(writer: asyncio.StreamWriter | None, *, graceful: bool = False) -> None:
    """Close the socket; with ``graceful``, give it (and TLS) :data:`SHUTDOWN_TIMEOUT` to shut down."""
    if writer is None:
        return
    if not graceful:
        writer.transport.abort()
    elif not writer.is_closing():
        writer.close()
    try:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        writer.transport.abort()
