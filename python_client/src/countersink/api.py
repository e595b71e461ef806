"""Synchronous calls to the sidecar's read and admin endpoints, on the caller's thread.

Each returns the decoded JSON answer or raises :class:`~countersink.errors.SidecarUnavailable`
(unreachable, timed out, 408/429/5xx) or :class:`~countersink.errors.SidecarRejected` (other 4xx).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from countersink import testing
from countersink.conf import app_settings
from countersink.transport import raise_for_status, transport

#: The sidecar answers at most this many users per bulk read.
MAX_USERS_PER_READ = 1000


def _call(method: str, path: str, *, token: str | None, timeout: float, payload: Any = None) -> Any:
    if app_settings.TEST_MODE and not path.startswith("/v1/users/") and not path.startswith("/v1/unread-counts"):
        return testing.admin_answer(path.partition("?")[0], payload)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = json.dumps(payload).encode() if payload is not None else None
    if method == "POST" and body is None:
        body = b"{}"
    response = transport.request(
        method,
        app_settings.SIDECAR_URL,
        path,
        body=body,
        headers=headers,
        connect_timeout=app_settings.CONNECT_TIMEOUT,
        timeout=timeout,
    )
    return raise_for_status(response, f"{method} {path}")


def get_unread_count(user_id: int) -> dict[str, int]:
    """``GET /v1/users/{id}/unread-count``: ``{"user_id", "unread_count"}``."""
    result: dict[str, int] = _call(
        "GET",
        f"/v1/users/{int(user_id)}/unread-count",
        token=app_settings.READ_TOKEN,
        timeout=app_settings.READ_TIMEOUT,
    )
    return result


def get_unread_counts(user_ids: Iterable[int]) -> list[dict[str, int]]:
    """``GET /v1/unread-counts?user_ids=...`` for at most :data:`MAX_USERS_PER_READ` users."""
    ids = ",".join(str(int(u)) for u in user_ids)
    result = _call(
        "GET",
        f"/v1/unread-counts?user_ids={ids}",
        token=app_settings.READ_TOKEN,
        timeout=app_settings.READ_TIMEOUT,
    )
    counts: list[dict[str, int]] = result["counts"]
    return counts


def flush() -> dict[str, Any]:
    """``POST /v1/flush``: write pending deltas into the count table now."""
    result: dict[str, Any] = _call(
        "POST", "/v1/flush", token=app_settings.ADMIN_TOKEN, timeout=app_settings.ADMIN_TIMEOUT
    )
    return result


def reconcile(user_ids: Iterable[int]) -> dict[str, Any]:
    """``POST /v1/reconcile`` for at most :data:`MAX_USERS_PER_READ` users: recount them from
    the notification table now; answers ``{"users_checked", "drift", "unfinished", ...}``."""
    result: dict[str, Any] = _call(
        "POST",
        "/v1/reconcile",
        token=app_settings.ADMIN_TOKEN,
        timeout=app_settings.ADMIN_TIMEOUT,
        payload={"user_ids": [int(u) for u in user_ids]},
    )
    return result


def status() -> dict[str, Any]:
    """``GET /v1/status``: pending users, open batches, the last flush."""
    result: dict[str, Any] = _call(
        "GET", "/v1/status", token=app_settings.ADMIN_TOKEN, timeout=app_settings.ADMIN_TIMEOUT
    )
    return result


def health() -> dict[str, Any]:
    """``GET /healthz``: the process answers."""
    result: dict[str, Any] = _call("GET", "/healthz", token=None, timeout=app_settings.READ_TIMEOUT)
    return result
