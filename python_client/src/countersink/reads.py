"""Reading unread counts: real time from the sidecar, the stored table when it cannot answer.

The sidecar answers ``stored + pending``: exact up to the last event it received. When it is
unreachable, slow (``READ_TIMEOUT``) or refuses the read, the count comes from the
``countersink_usernotificationscount`` table instead, which lags by the deltas not yet flushed;
each such fallback is logged. After a failure the sidecar is skipped for
``READ_FAILURE_COOLDOWN`` seconds, so an outage does not add a timeout to every page view.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from countersink import api, testing
from countersink.conf import app_settings
from countersink.errors import CountersinkError, SidecarUnavailable

logger = logging.getLogger("countersink")

_skip_lock = threading.Lock()
_skip_until = 0.0
_skip_reason = ""


def user_id_of(user: Any) -> int | None:
    """The id of a user object or an id; ``None`` for an anonymous user."""
    if user is None:
        return None
    if isinstance(user, bool):
        raise TypeError("expected a user or a user id, got a bool")
    if isinstance(user, int):
        return user
    if getattr(user, "is_anonymous", False):
        return None
    pk = getattr(user, "pk", None)
    if pk is None:
        raise TypeError(f"expected a user or a user id, got {user!r}")
    return int(pk)


def unread_count(user: Any) -> int:
    """The user's unread notifications, in real time; 0 for an anonymous user."""
    user_id = user_id_of(user)
    if user_id is None:
        return 0
    if app_settings.TEST_MODE:
        return testing.orm_counts([user_id])[user_id]
    failure = _skipping()
    if failure is None:
        try:
            return int(api.get_unread_count(user_id)["unread_count"])
        except (CountersinkError, KeyError, TypeError, ValueError) as e:
            failure = _failed(e)
    return stored_counts([user_id], failure)[user_id]


def unread_counts(users: Iterable[Any]) -> dict[int, int]:
    """Unread counts of many users, keyed by user id, in one request per 1000 users."""
    ids = sorted({uid for uid in (user_id_of(u) for u in users) if uid is not None})
    if app_settings.TEST_MODE:
        return testing.orm_counts(ids)
    counts: dict[int, int] = {}
    failure = _skipping()
    if failure is None:
        try:
            for start in range(0, len(ids), api.MAX_USERS_PER_READ):
                for row in api.get_unread_counts(ids[start : start + api.MAX_USERS_PER_READ]):
                    counts[int(row["user_id"])] = int(row["unread_count"])
            return counts
        except (CountersinkError, KeyError, TypeError, ValueError) as e:
            failure = _failed(e)
    return stored_counts(ids, failure)


def stored_counts(user_ids: list[int], reason: str | None = None) -> dict[int, int]:
    """Counts from the stored table (0 for users without a row); logs why if ``reason``."""
    from countersink.models import UserNotificationsCount

    if not user_ids:
        return {}
    if reason is not None:
        logger.warning(
            "countersink: served stored unread counts (not real time) for %d user(s) because %s",
            len(user_ids),
            reason,
        )
    rows = UserNotificationsCount.objects.filter(pk__in=user_ids).values_list("pk", "unread_count")
    found = {int(pk): int(count) for pk, count in rows}
    return {uid: found.get(uid, 0) for uid in user_ids}


def _skipping() -> str | None:
    """Why the sidecar is being skipped right now, if it is."""
    if _skip_until and time.monotonic() < _skip_until:
        return f"the sidecar failed recently ({_skip_reason})"
    return None


def _failed(error: Exception) -> str:
    global _skip_until, _skip_reason
    reason = str(error) if isinstance(error, CountersinkError) else f"unexpected answer ({error!r})"
    cooldown = app_settings.READ_FAILURE_COOLDOWN
    if cooldown > 0 and isinstance(error, SidecarUnavailable):
        with _skip_lock:
            _skip_until = time.monotonic() + cooldown
            _skip_reason = reason
    return reason


def reset_read_cooldown() -> None:
    """Forgets a recent read failure, so the next read asks the sidecar again."""
    global _skip_until
    with _skip_lock:
        _skip_until = 0.0
