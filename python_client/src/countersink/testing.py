"""Test mode, for a host project's own test suite: no sidecar needed.

With ``COUNTERSINK["TEST_MODE"] = True`` (in the test settings):

- nothing is sent: events and recounts are discarded on the caller's thread;
- :func:`countersink.unread_count` / ``unread_counts`` and the template tags count the
  notification table with the ORM (:func:`orm_counts`), so they are exact at once, inside the
  test's transaction too;
- the admin calls (``flush``, ``reconcile``, ``status``, the management commands) answer as an
  idle sidecar would, without a request;
- ``migrate`` creates the unmanaged ``countersink_usernotificationscount`` table when it is
  missing (normally the sidecar's migrations create it), so code that reads
  ``UserNotificationsCount`` finds an empty table instead of an error.

The package's own tests run with the real sidecar; ``tests/test_test_mode.py`` checks this mode.
"""

from __future__ import annotations

from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, models
from django.db.models.signals import post_migrate

from countersink import conf
from countersink.conf import app_settings


def enabled() -> bool:
    """Whether ``TEST_MODE`` is on."""
    return app_settings.TEST_MODE


def orm_counts(user_ids: list[int]) -> dict[int, int]:
    """Each user's unread, not soft-deleted notifications, counted by the database."""
    if not user_ids:
        return {}
    m = conf.mapping()
    rows = (
        m.model._base_manager.filter(**{f"{m.recipient_attname}__in": user_ids}, **m.unread_lookups())
        .order_by()
        .values_list(m.recipient_attname)
        .annotate(n=models.Count("pk"))
    )
    found = {int(user_id): int(n) for user_id, n in rows}
    return {uid: found.get(uid, 0) for uid in user_ids}


#: What the admin endpoints answer in test mode: an idle sidecar.
def admin_answer(path: str, payload: Any = None) -> dict[str, Any]:
    if path == "/v1/flush":
        return {"batches": [], "users_written": 0, "skipped": None, "duration_ms": 0}
    if path == "/v1/reconcile":
        users = list(payload.get("user_ids", [])) if isinstance(payload, dict) else []
        return {"users_checked": len(users), "drift": [], "unfinished": [], "duration_ms": 0}
    if path == "/v1/status":
        return {"pending_users": 0, "open_batches": 0, "recounts_waiting": 0, "recounts_running": 0, "last_flush": None}
    return {"status": "ok"}


def create_count_table(using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> bool:
    """Creates ``countersink_usernotificationscount`` on ``using`` if it is missing (test mode
    only); returns whether it did. Connected to ``post_migrate``."""
    if not enabled():
        return False
    from countersink.models import UserNotificationsCount

    connection = connections[using]
    table = UserNotificationsCount._meta.db_table
    if table in connection.introspection.table_names():
        return False
    with connection.schema_editor() as editor:
        editor.create_model(UserNotificationsCount)
    return True


def _on_post_migrate(sender: Any, using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> None:
    if getattr(sender, "name", None) == "countersink":
        create_count_table(using)


def connect() -> None:
    """Connects the ``post_migrate`` receiver (it does nothing unless ``TEST_MODE`` is on)."""
    post_migrate.connect(_on_post_migrate, dispatch_uid="countersink.testing.post_migrate")
