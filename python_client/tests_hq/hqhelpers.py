"""Helpers for the django-notifications-hq suite: users, notifications, the exactness check."""

from __future__ import annotations

import itertools
from typing import Any

from django.contrib.auth import get_user_model
from notifications.models import Notification
from notifications.signals import notify

import countersink
from countersink import api
from countersink.models import UserNotificationsCount

User = get_user_model()
_names = itertools.count()


def make_user(prefix: str = "hq") -> Any:
    return User.objects.create(username=f"{prefix}-{next(_names)}")


def send(actor: Any, recipient: Any, n: int = 1) -> None:
    """``n`` notifications through the app's own ``notify.send`` (a ``save()`` each)."""
    for i in range(n):
        notify.send(actor, recipient=recipient, verb=f"pinged you #{i}")


def truth(user_id: int) -> int:
    return int(Notification.objects.filter(recipient_id=user_id, unread=True, deleted=False).count())


def live(user: Any) -> int:
    assert countersink.wait_for_recounts(20), countersink.stats()
    return int(api.get_unread_count(user.pk)["unread_count"])


def users_off() -> dict[str, list[tuple[int, int, int]]]:
    """Every user whose count differs from the table: ``(user, countersink's, truth)``, in real
    time and stored after a flush. Waits for recounts first; never reconciles."""
    assert countersink.wait_for_recounts(30), countersink.stats()
    ids = sorted(User.objects.values_list("pk", flat=True))
    expected = {uid: truth(uid) for uid in ids}
    realtime = {row["user_id"]: row["unread_count"] for row in api.get_unread_counts(ids)}
    api.flush()
    stored = dict(UserNotificationsCount.objects.filter(pk__in=ids).values_list("pk", "unread_count"))
    return {
        "realtime": [(u, realtime.get(u, 0), expected[u]) for u in ids if realtime.get(u, 0) != expected[u]],
        "stored": [(u, stored.get(u, 0), expected[u]) for u in ids if stored.get(u, 0) != expected[u]],
    }
