"""Helpers for the end-to-end tests: users, notifications, and the exactness check."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.contrib.auth import get_user_model
from testproject.notifications.models import Notification

import countersink
from countersink import api
from countersink.errors import SidecarUnavailable
from countersink.models import UserNotificationsCount

User = get_user_model()
_names = itertools.count()

#: Seconds to wait for the sender to empty its queue.
SETTLE_TIMEOUT = 20.0
#: Seconds a recount may take: the sidecar takes queued recounts once a second.
RECOUNT_TIMEOUT = 5.0

T = TypeVar("T")


def make_user(prefix: str = "user") -> Any:
    return User.objects.create(username=f"{prefix}-{next(_names)}")


def make_users(n: int, prefix: str = "user") -> list[Any]:
    return [make_user(prefix) for _ in range(n)]


def notify(user: Any, n: int = 1, **fields: Any) -> list[Notification]:
    """Creates ``n`` notifications with ``save()`` (the signal path)."""
    return [Notification.objects.create(recipient=user, text=f"hello {i}", **fields) for i in range(n)]


def orm_unread(user: Any) -> int:
    """The truth: counted from the notification table."""
    return int(Notification.objects.filter(recipient=user, unread=True, deleted=False).count())


def settle() -> None:
    """Waits until this process sent everything, and the sidecar took its queued recounts."""
    assert countersink.wait_until_sent(SETTLE_TIMEOUT), f"events still unsent: {countersink.stats()}"
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        try:
            waiting = api.status().get("recounts_waiting", 0)
        except SidecarUnavailable:
            return  # stopped by the test: nothing to wait for
        if not waiting:
            return
        assert time.monotonic() < deadline, "the sidecar did not take its queued recounts"
        time.sleep(0.05)


def eventually(read: Callable[[], T], expected: T, timeout: float = RECOUNT_TIMEOUT) -> None:
    """``read()`` becomes ``expected`` within ``timeout``: for recounts, which the sidecar
    runs in the background (about once a second)."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    assert value == expected, _difference(value, expected, timeout)


def _difference(value: object, expected: object, timeout: float) -> str:
    """For a failed :func:`eventually`: the keys of two dicts whose values differ (a count per user)."""
    if not (isinstance(value, dict) and isinstance(expected, dict)):
        return f"read {value!r}, expected {expected!r} after {timeout} s"
    keys = expected.keys() | value.keys()
    differ = {k: (value.get(k), expected.get(k)) for k in keys if value.get(k) != expected.get(k)}
    return f"(read, expected) where they differ after {timeout} s: {differ}"


def eventually_live(user: Any, expected: int) -> None:
    settle()
    eventually(lambda: int(api.get_unread_count(user.pk)["unread_count"]), expected)


def live(user: Any) -> int:
    """The sidecar's real-time count (after the sender settled)."""
    settle()
    return int(api.get_unread_count(user.pk)["unread_count"])


def stored(user_id: int) -> int:
    row = UserNotificationsCount.objects.filter(pk=user_id).first()
    return row.unread_count if row is not None else 0


def assert_counts_exact() -> None:
    """Every user's count equals the ORM's: in real time, and stored after a flush.

    Recounts run in the sidecar's background, so the real-time counts may take a moment to
    settle; what they settle on must be exact.
    """
    settle()
    user_ids = sorted(User.objects.values_list("pk", flat=True))
    expected = {
        uid: Notification.objects.filter(recipient_id=uid, unread=True, deleted=False).count() for uid in user_ids
    }

    def realtime() -> dict[int, int]:
        counts = {uid: 0 for uid in user_ids}
        for start in range(0, len(user_ids), 1000):
            for row in api.get_unread_counts(user_ids[start : start + 1000]):
                counts[row["user_id"]] = row["unread_count"]
        return counts

    eventually(realtime, expected)
    api.flush()
    assert {uid: stored(uid) for uid in user_ids} == expected, "stored counts differ from the ORM after a flush"
