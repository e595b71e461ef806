"""Live counts in the browser: stream tokens and stream URLs for the sidecar's SSE endpoint.

A browser's ``EventSource`` cannot send headers, so the sidecar's
``GET /v1/users/{id}/unread-count/stream`` takes ``?token=``: a token for one user, valid until
an expiry, signed with a key derived from ``WEBHOOK_SECRET`` (which Django and the sidecar
already share). Minting needs no request to the sidecar. The format, as the sidecar checks it::

    token = f"{expires}.{base64url(HMAC-SHA256(k, f'{user_id}.{expires}'))}"   # no padding
    k     = HMAC-SHA256(secret bytes, b"countersink live stream token v1")

A token only lets its holder watch one user's count; it is checked when a stream opens, so an
open stream outlives it, and a reconnect after it needs a new one (``views.stream_url``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from countersink import signing
from countersink.conf import app_settings
from countersink.reads import user_id_of

#: The label the token key is derived with; the sidecar uses the same.
KEY_LABEL = b"countersink live stream token v1"


def stream_token(user_id: int, ttl: int | None = None, now: float | None = None) -> str:
    """A stream token for ``user_id``, valid for ``ttl`` seconds (``STREAM_TOKEN_TTL``)."""
    secret = app_settings.WEBHOOK_SECRET
    if not secret:
        raise signing.InvalidSecret("COUNTERSINK['WEBHOOK_SECRET'] is not set; it signs stream tokens")
    key = hmac.new(signing.decode_secret(secret), KEY_LABEL, hashlib.sha256).digest()
    expires = int(now if now is not None else time.time()) + (ttl if ttl is not None else app_settings.STREAM_TOKEN_TTL)
    mac = hmac.new(key, f"{user_id}.{expires}".encode(), hashlib.sha256).digest()
    return f"{expires}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def stream_url(user: Any) -> str | None:
    """The URL a browser opens with ``EventSource`` for ``user``'s count; ``None`` when anonymous."""
    user_id = user_id_of(user)
    if user_id is None:
        return None
    return f"{app_settings.STREAM_URL}/v1/users/{user_id}/unread-count/stream?token={stream_token(user_id)}"
