"""Events as the receivers build them, and their wire format.

On the caller's thread an event is a plain tuple (cheap to build); the sender thread turns it
into JSON. The three kinds:

- ``post_save``: ``{"kind", "notification_id", "user_id", "unread", "created", "occurred_at"}``
- ``post_delete``: ``{"kind", "notification_id", "user_id", "occurred_at"}``
- ``recount``: ``{"kind", "user_id"}``: "recount this user from the notification table"
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone

POST_SAVE = "post_save"
POST_DELETE = "post_delete"
RECOUNT = "recount"

#: The sidecar accepts at most this many events per request.
MAX_EVENTS_PER_REQUEST = 1000
#: The largest id the sidecar accepts (a signed 64-bit primary key).
MAX_ID = 2**63 - 1

#: ``(kind, notification_id, user_id, unread, created, occurred_at as a unix time)``;
#: ``notification_id`` is 0 and ``occurred_at`` 0.0 for a recount.
Event = tuple[str, int, int, bool, bool, float]


def save_event(notification_id: int, user_id: int, unread: bool, created: bool, at: float) -> Event:
    """A ``post_save``."""
    return (POST_SAVE, notification_id, user_id, unread, created, at)


def delete_event(notification_id: int, user_id: int, at: float) -> Event:
    """A ``post_delete`` (also what a soft delete sends)."""
    return (POST_DELETE, notification_id, user_id, False, False, at)


def recount_event(user_id: int) -> Event:
    """A ``recount``: the user's notifications changed in a way no event described."""
    return (RECOUNT, 0, user_id, False, False, 0.0)


def to_wire(event: Event) -> dict[str, object]:
    """The JSON object the sidecar expects; unknown fields would be rejected."""
    kind, notification_id, user_id, unread, created, at = event
    if kind == RECOUNT:
        return {"kind": kind, "user_id": user_id}
    wire: dict[str, object] = {"kind": kind, "notification_id": notification_id, "user_id": user_id}
    if kind == POST_SAVE:
        wire["unread"] = unread
        wire["created"] = created
    if at:
        wire["occurred_at"] = datetime.fromtimestamp(at, timezone.utc).isoformat()
    return wire


def encode(events: Iterable[Event]) -> bytes:
    """A request body: a JSON array."""
    return json.dumps([to_wire(e) for e in events], separators=(",", ":")).encode()


def user_ids(events: Iterable[Event]) -> set[int]:
    """The users a list of events concerns."""
    return {event[2] for event in events}


def chunks(events: list[Event], size: int = MAX_EVENTS_PER_REQUEST) -> list[list[Event]]:
    """``events`` in request-sized pieces, order kept."""
    return [events[i : i + size] for i in range(0, len(events), size)]
