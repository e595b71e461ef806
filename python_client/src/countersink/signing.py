"""Standard Webhooks signatures for ``POST /v1/events``.

``webhook-signature`` is ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}." + body)), where
the key is the base64-decoded secret after its ``whsec_`` prefix. The id stays the same across
retries of one batch; the timestamp is the time of each attempt, so a retry after minutes is not
rejected as stale.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import uuid

SECRET_PREFIX = "whsec_"
#: The sidecar refuses shorter keys at start-up (Standard Webhooks suggests 24 to 64 bytes).
MIN_KEY_BYTES = 16


class InvalidSecret(ValueError):
    """The secret is not ``whsec_`` followed by base64."""


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret(f"the secret must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidSecret(f"the part after {SECRET_PREFIX!r} is not base64 ({e})") from e
    if not key:
        raise InvalidSecret("the secret is empty")
    return key


def new_message_id() -> str:
    """A fresh ``webhook-id``: one per batch, reused on its retries."""
    return f"msg_{uuid.uuid4().hex}"


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one attempt."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(key: bytes | None, message_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers (none but the id when there is no key)."""
    timestamp = int(time.time() if now is None else now)
    result = {"webhook-id": message_id, "webhook-timestamp": str(timestamp)}
    if key is not None:
        result["webhook-signature"] = sign(key, message_id, timestamp, body)
    return result
