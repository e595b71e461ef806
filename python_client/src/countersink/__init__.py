"""countersink: exact, fast unread-notification counts for Django, kept by a sidecar.

A map of the package, one owner per concept:

| module                | owns                                                                  |
|-----------------------|-----------------------------------------------------------------------|
| ``conf``              | the ``COUNTERSINK`` settings dict, read lazily; the model mapping     |
| ``checks``            | system checks ``countersink.E001``... for misconfiguration           |
| ``apps``              | ``ready()``: connects the receivers                                   |
| ``receivers``         | ``post_save`` / ``post_delete`` → events (thin)                       |
| ``collector``         | events wait for their transaction's commit; one batch per transaction |
| ``sender``            | the background thread: bounded queue, retries, drops and repairs      |
| ``transport``         | keep-alive HTTP connections; error statuses → exceptions              |
| ``signing``           | Standard Webhooks signatures                                          |
| ``events``            | the event tuples and their JSON                                       |
| ``bulk``              | update / bulk_create / bulk_update / raw SQL: recounts and helpers    |
| ``reads``             | ``unread_count`` with the stored-table fallback                       |
| ``api``               | the sidecar's read and admin endpoints                                |
| ``reconcile``         | reconcile in chunks; which users "all" means                          |
| ``models``            | ``UserNotificationsCount``, the unmanaged count table                 |
| ``templatetags``      | ``{% unread_count %}``, ``{% unread_badge %}``, ``{% live_unread_badge %}`` |
| ``live``              | stream tokens and URLs for the live badge (``static/countersink/live.js``) |
| ``views``, ``urls``   | ``countersink-stream-url``: a fresh stream URL for the logged-in user  |
| ``management``        | ``countersink_flush``, ``countersink_reconcile``, ``countersink_status`` |
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from countersink.bulk import (
    CountersinkManager,
    CountersinkQuerySet,
    bulk_create,
    bulk_update,
    mark_all_read,
    recount_users,
    update,
)
from countersink.errors import CountersinkError, SidecarRejected, SidecarUnavailable
from countersink.reads import unread_count, unread_counts
from countersink.sender import sender as _sender

__all__ = [
    "CountersinkError",
    "CountersinkManager",
    "CountersinkQuerySet",
    "SidecarRejected",
    "SidecarUnavailable",
    "bulk_create",
    "bulk_update",
    "dropped_user_ids",
    "mark_all_read",
    "reconcile_users",
    "recount_users",
    "repair_dropped",
    "stats",
    "unread_count",
    "unread_counts",
    "update",
    "wait_until_sent",
]

__version__ = "0.1.0"


def stats() -> dict[str, int]:
    """This process's sending counters: queued, sent, retried, dropped events, queue length..."""
    return _sender.stats()


def dropped_user_ids() -> frozenset[int]:
    """Users whose events this process dropped and has not repaired yet."""
    return _sender.dropped_user_ids()


def repair_dropped() -> frozenset[int]:
    """Sends a ``recount`` for every user in :func:`dropped_user_ids` now; returns them."""
    return _sender.repair_dropped()


def reconcile_users(user_ids: Iterable[int]) -> dict[str, Any]:
    """Has the sidecar recount ``user_ids`` now (synchronously) and repair their counts.

    Returns ``{"users_checked", "drift": [{"user_id", "stored", "actual"}], "unfinished"}``;
    raises :class:`SidecarUnavailable` / :class:`SidecarRejected`.
    """
    from countersink.reconcile import reconcile_users as run

    return run(user_ids)


def wait_until_sent(timeout: float | None = None) -> bool:
    """Blocks until every queued event was sent (or dropped); ``False`` on timeout."""
    return _sender.wait_until_sent(timeout)
