"""countersink: exact, fast unread-notification counts for Django, kept by a sidecar.

A map of the package, one owner per concept:

| module                | owns                                                                  |
|-----------------------|-----------------------------------------------------------------------|
| ``conf``              | the ``COUNTERSINK`` settings dict, read lazily; the model mapping     |
| ``checks``            | system checks ``countersink.E001``... for misconfiguration           |
| ``apps``              | ``ready()``: connects the receivers, wraps managers if asked          |
| ``receivers``         | ``post_save`` / ``post_delete`` → events (thin)                       |
| ``collector``         | events wait for their transaction's commit; one batch per transaction |
| ``sender``            | the background thread: bounded queue, retries, drops and repairs      |
| ``transport``         | keep-alive HTTP connections; error statuses → exceptions              |
| ``signing``           | Standard Webhooks signatures                                          |
| ``events``            | the event tuples and their JSON                                       |
| ``bulk``              | update / bulk_create / bulk_update / raw SQL: recounts and helpers    |
| ``managers``          | ``TRACK_BULK_WRITES``: wrapping the managers of a model you do not own |
| ``testing``           | ``TEST_MODE``: a host project's tests without a sidecar                |
| ``pytest_plugin``     | the ``countersink_wait`` and ``countersink_test_mode`` fixtures        |
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

import time
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
from countersink.managers import track_bulk_writes
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
    "track_bulk_writes",
    "unread_count",
    "unread_counts",
    "update",
    "wait_for_recounts",
    "wait_until_sent",
]

__version__ = "0.1.0"


#: Seconds between two looks at the sidecar's recount queue in :func:`wait_for_recounts`.
RECOUNT_POLL_INTERVAL = 0.02


def stats() -> dict[str, int]:
    """This process's sending counters (each defined in the README, *Delivery*)."""
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


def wait_for_recounts(timeout: float = 10.0) -> bool:
    """Blocks until this process sent every queued event and recount, and the sidecar finished
    every recount queued with it (``recounts_waiting`` and ``recounts_running`` both 0, from any
    process); ``False`` on timeout or when the sidecar cannot be asked. Needs ``ADMIN_TOKEN``.

    For tests and scripts: after ``update()``, ``mark_all_read()`` or an app's bulk method the
    counts are exact once this returns ``True``. In ``TEST_MODE`` it returns ``True`` at once.
    """
    from countersink import api
    from countersink.conf import app_settings

    if app_settings.TEST_MODE:
        return True
    deadline = time.monotonic() + timeout
    if not _sender.wait_until_sent(timeout):
        return False
    while True:
        try:
            status = api.status()
        except CountersinkError:
            return False
        if not status.get("recounts_waiting") and not status.get("recounts_running"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(RECOUNT_POLL_INTERVAL)
