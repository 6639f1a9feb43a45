"""Test harness: a ServerProtocol and a ClientProtocol wired together in memory, each with a tiny shell.

The shells do what the asyncio shells will do: write SendData, finish TLS at once on StartTLS, and take
payloads through the bypass contract - ``take_buffered()`` then "read the rest from the socket" (straight
from the byte queue that stands for it) and ``payload_consumed()``.  ``chunk`` sets how many bytes each
``receive_data()`` call gets (``None``: everything available), so every scenario can be replayed one
byte at a time.  Payloads are recorded as :class:`Payload` events right after the event announcing them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cowbackup.nbd.client import ClientProtocol
from cowbackup.nbd.constants import (
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
)
from cowbackup.nbd.errors import ProtocolError
from cowbackup.nbd.events import ConnectionClosed, NeedData, SendData, StartTLS
from cowbackup.nbd.exports import ExportInfo
from cowbackup.nbd.replies import FileSegment
from cowbackup.nbd.server import ServerProtocol, TLSMode

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

ALL_FLAGS = (
    NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_SEND_FAST_ZERO
    | NBD_FLAG_SEND_CACHE
    | NBD_FLAG_CAN_MULTI_CONN
)


def default_exports() -> dict[str, ExportInfo]:
    disk = ExportInfo("disk", 1 * MiB, ALL_FLAGS, description="the test disk")
    return {
        "": disk,
        "disk": disk,
        "ro": ExportInfo(
            "ro",
            64 * KiB,
            NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES,
        ),
        "plain": ExportInfo("plain", 8 * GiB),
        "strict": ExportInfo(
            "strict",
            64 * KiB,
            ALL_FLAGS,
            min_block_size=512,
            max_block_size=64 * KiB,
            block_size_required=True,
        ),
    }


def make_server(
    exports: dict[str, ExportInfo] | None = None, *, tls: TLSMode = "off", max_payload: int = 32 * MiB
) -> ServerProtocol:
    table = default_exports() if exports is None else exports

    def listed() -> list[ExportInfo]:
        return list({info.name: info for info in table.values()}.values())

    return ServerProtocol(lookup=table.get, list_exports=listed, tls=tls, max_payload=max_payload)


@dataclass(frozen=True)
class Payload:
    """The payload bytes a shell took for the event just before it."""

    data: bytes


@dataclass
class Side:
    proto: ServerProtocol | ClientProtocol
    inbox: bytearray = field(default_factory=bytearray)  # stands for the socket
    eof: bool = False
    eof_sent: bool = False
    events: list[object] = field(default_factory=list)
    dead: bool = False


class Wire:
    """A server and a client connected in memory (see the module docstring)."""

    def __init__(
        self,
        server: ServerProtocol | None = None,
        client: ClientProtocol | None = None,
        *,
        chunk: int | None = None,
        bypass: bool = True,
    ) -> None:
        self.server = server or make_server()
        self.client = client or ClientProtocol()
        self.chunk = chunk
        self.bypass = bypass
        self.s = Side(self.server)
        self.c = Side(self.client)
        self.c.inbox += self.server.initial_bytes()

    # -- what tests call ---------------------------------------------------------------------------

    def client_send(self, data: bytes | Iterable[bytes | memoryview]) -> None:
        self.s.inbox += data if isinstance(data, bytes) else b"".join(data)

    def server_send(self, data: bytes | Iterable[bytes | memoryview | FileSegment]) -> None:
        if isinstance(data, bytes):
            self.c.inbox += data
            return
        for piece in data:
            if isinstance(piece, FileSegment):
                self.c.inbox += os.pread(piece.fd, piece.length, piece.offset)
            else:
                self.c.inbox += piece

    def client_close(self) -> None:
        self.s.eof = True

    def server_close(self) -> None:
        self.c.eof = True

    def run(self) -> Wire:
        """Move bytes and handle events until neither side can make progress."""
        for _ in range(100_000):
            if not (self._step(self.s, self.c) | self._step(self.c, self.s)):
                return self
        raise AssertionError("the conversation does not settle")

    def take_server_events(self) -> list[object]:
        events, self.s.events = self.s.events, []
        return events

    def take_client_events(self) -> list[object]:
        events, self.c.events = self.c.events, []
        return events

    # -- the shells --------------------------------------------------------------------------------

    def _feed(self, side: Side) -> bool:
        if side.inbox:
            n = len(side.inbox) if self.chunk is None else min(self.chunk, len(side.inbox))
            side.proto.receive_data(bytes(side.inbox[:n]))
            del side.inbox[:n]
            return True
        if side.eof and not side.eof_sent:
            side.eof_sent = True
            side.proto.receive_data(b"")
            return True
        return False

    def _step(self, side: Side, peer: Side) -> bool:
        moved = False
        while not side.dead:
            event = side.proto.next_event()
            if isinstance(event, NeedData):
                if not self._feed(side):
                    return moved
                moved = True
                continue
            moved = True
            side.events.append(event)
            if isinstance(event, ProtocolError | ConnectionClosed):
                side.dead = True
                if isinstance(event, ProtocolError):
                    peer.eof = True  # a hard disconnect: the shell closes the socket
            elif isinstance(event, SendData):
                peer.inbox += event.data
            elif isinstance(event, StartTLS):
                side.proto.tls_started()
            else:
                length = getattr(event, "payload_length", 0)
                if length:
                    side.events.append(Payload(self._payload(side, length)))
        return moved

    def _payload(self, side: Side, length: int) -> bytes:
        proto = side.proto
        if self.bypass:
            view = proto.take_buffered(length)
            rest = length - len(view)
            assert len(side.inbox) >= rest, "the sender always sends whole messages in these tests"
            data = bytes(view) + bytes(side.inbox[:rest])
            del side.inbox[:rest]
            proto.payload_consumed(rest)
            return data
        parts: list[bytes] = []
        left = length
        while left:
            view = proto.take_buffered(left)
            parts.append(bytes(view))
            left -= len(view)
            if left:
                assert self._feed(side), "payload cut short"
        return b"".join(parts)


def connect(
    export: str = "disk",
    *,
    server: ServerProtocol | None = None,
    chunk: int | None = None,
    meta_contexts: Sequence[str] = ("base:allocation",),
    structured: bool = True,
) -> Wire:
    """A Wire whose client ran go(export) to transmission; its events are cleared."""
    wire = Wire(server, chunk=chunk).run()
    wire.client_send(wire.client.go(export, structured=structured, meta_contexts=meta_contexts))
    wire.run()
    wire.take_client_events()
    wire.take_server_events()
    return wire
