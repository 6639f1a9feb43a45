"""Job events and the bus that carries them to subscribers (the QMP sessions, the CLI, tests).

Event names and data fields are QEMU's QMP events, exactly (qapi/job.json, qapi/block-core.json):

* ``JOB_STATUS_CHANGE``: ``id``, ``status``
* ``BLOCK_JOB_COMPLETED``: ``type``, ``device``, ``len``, ``offset``, ``speed``, ``error`` (only on failure)
* ``BLOCK_JOB_CANCELLED``: ``type``, ``device``, ``len``, ``offset``, ``speed``
* ``BLOCK_JOB_ERROR``: ``device``, ``operation`` (``read``/``write``),
  ``action`` (``report``/``ignore``/``stop``)
* ``BLOCK_JOB_PENDING``: ``type``, ``id``

The bus adds nothing: the QMP layer adds ``timestamp`` when it sends an event to a session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_PENDING",
    "JOB_STATUS_CHANGE",
    "Event",
    "EventBus",
    "Subscriber",
]

log = logging.getLogger(__name__)

JOB_STATUS_CHANGE = "JOB_STATUS_CHANGE"
BLOCK_JOB_COMPLETED = "BLOCK_JOB_COMPLETED"
BLOCK_JOB_CANCELLED = "BLOCK_JOB_CANCELLED"
BLOCK_JOB_ERROR = "BLOCK_JOB_ERROR"
BLOCK_JOB_PENDING = "BLOCK_JOB_PENDING"


@dataclass(frozen=True)
class Event:
    """One QMP event: its name and its ``data`` member.

    ``data`` is owned by the event once emitted; subscribers must treat it as read-only.
    """

    name: str
    data: dict[str, Any]


Subscriber = Callable[[Event], None]


class EventBus:
    """Delivers every emitted event, synchronously and in emit order, to every subscriber.

    Contract for subscribers: they run inside the emitter's call, in the middle of a state change, so they
    must be quick and must not call back into the emitter (job verbs and the like); a subscriber that needs
    to act schedules the action instead (e.g. puts the event on an ``asyncio.Queue``). An exception raised
    by a subscriber is logged and does not stop delivery to the others.

    Owned by the event loop's thread; no locking.
    """

    def __init__(self) -> None:
        # Insertion-ordered so that delivery order is subscription order; the key is a token so that the
        # same callable may be subscribed twice and unsubscribed independently.
        self._subscribers: dict[object, Subscriber] = {}

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every event emitted from now on.

        Returns a function that unsubscribes; calling it more than once is harmless.
        """
        token = object()
        self._subscribers[token] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to every current subscriber before returning."""
        log.debug("event %s %s", event.name, event.data)
        # Iterate over a snapshot: a subscriber may subscribe or unsubscribe while we deliver.
        for callback in list(self._subscribers.values()):
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", callback, event.name)
