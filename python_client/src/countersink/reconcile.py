"""Reconciling: the sidecar recounts users from the notification table and reports the drift.

``POST /v1/reconcile`` takes at most 1000 users per request; :func:`reconcile_users` splits
and adds up. "Every user" is worked out here, from the database Django sees: the recipients of
any notification (soft-deleted ones included) and the users with a stored count. The sidecar's
own ``countersink reconcile --all`` (or ``--reconcile-cron``) walks the same set without
going through Django.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from countersink import api, conf
from countersink.models import UserNotificationsCount

#: Users per request, the sidecar's default limit (--max-read-users).
USERS_PER_REQUEST = api.MAX_USERS_PER_READ


def reconcile_users(
    user_ids: Iterable[int], progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Recounts ``user_ids``; one summed report: ``users_checked``, ``drift``, ``unfinished``."""
    total: dict[str, Any] = {"users_checked": 0, "drift": [], "unfinished": [], "duration_ms": 0}
    chunk: list[int] = []

    def send() -> None:
        report = api.reconcile(chunk)
        total["users_checked"] += int(report.get("users_checked", 0))
        total["drift"] += report.get("drift") or []
        total["unfinished"] += report.get("unfinished") or []
        total["duration_ms"] += int(report.get("duration_ms", 0))
        chunk.clear()
        if progress is not None:
            progress(total)

    for user_id in user_ids:
        chunk.append(int(user_id))
        if len(chunk) == USERS_PER_REQUEST:
            send()
    if chunk:
        send()
    return total


def all_user_ids() -> Iterator[int]:
    """Every user a count may be wrong for, in id order, streamed from the database."""
    m = conf.mapping()
    recipients = (
        m.model._base_manager.order_by()
        .exclude(**{f"{m.recipient_attname}__isnull": True})
        .values_list(m.recipient_attname, flat=True)
        .distinct()
    )
    users = set(recipients.iterator(chunk_size=10_000))
    users.update(UserNotificationsCount.objects.values_list("pk", flat=True).iterator(chunk_size=10_000))
    yield from sorted(users)
