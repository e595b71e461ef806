"""The ``COUNTERSINK`` settings dict, read lazily so ``override_settings`` works.

Nothing is read at import time. On first use, ``settings.COUNTERSINK`` is merged over
:data:`DEFAULTS` and kept, with the resolved model mapping (:func:`mapping`), for the hot path
inside ``save()``; both are dropped whenever ``COUNTERSINK`` changes (Django's
``setting_changed`` signal, which ``override_settings`` sends), as Django REST framework does.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.db import models

#: The name of the Django setting.
SETTING = "COUNTERSINK"

#: Every key ``COUNTERSINK`` may hold, with its default. ``None`` means "not set".
DEFAULTS: dict[str, Any] = {
    # Off switch: no events are collected or sent (reads still work).
    "ENABLED": True,
    # Where the sidecar listens.
    "SIDECAR_URL": "http://127.0.0.1:7878",
    # Standard Webhooks secret, "whsec_" + base64; signs every POST /v1/events.
    "WEBHOOK_SECRET": None,
    # Bearer token for /v1/flush, /v1/reconcile and /v1/status.
    "ADMIN_TOKEN": None,
    # Bearer token for the count reads; optional.
    "READ_TOKEN": None,
    # The notification model, "app_label.ModelName".
    "MODEL": None,
    # The ForeignKey to the user on MODEL.
    "RECIPIENT_FIELD": "recipient",
    # The boolean field that says whether a notification was read.
    "READ_STATE_FIELD": "unread",
    # The value of READ_STATE_FIELD that means "unread": True for `unread`, False for `is_read`.
    "UNREAD_WHEN": True,
    # A boolean or nullable timestamp field whose truthy value means "deleted"; optional.
    "SOFT_DELETE_FIELD": None,
    # Seconds to open a TCP connection to the sidecar.
    "CONNECT_TIMEOUT": 0.5,
    # Seconds to wait for the answer to POST /v1/events (background thread).
    "SEND_TIMEOUT": 2.0,
    # Seconds the sender waits to gather more events into one request (0: send at once).
    "SEND_LINGER": 0.005,
    # Seconds to wait for a count read (request thread); then the stored table answers.
    "READ_TIMEOUT": 0.5,
    # Seconds to wait for flush, reconcile and status (management commands).
    "ADMIN_TIMEOUT": 60.0,
    # Events waiting to be sent (about 150 bytes each); a batch that does not fit is dropped
    # and its users are recounted later.
    "QUEUE_SIZE": 100_000,
    # Retries of one request after the first attempt (8: up to about half a minute of outage).
    "MAX_RETRIES": 8,
    # Seconds: the first backoff; each retry doubles it (full jitter), up to RETRY_BACKOFF_MAX.
    "RETRY_BACKOFF": 0.2,
    "RETRY_BACKOFF_MAX": 10.0,
    # Seconds the process waits at exit for queued events to be sent.
    "SHUTDOWN_TIMEOUT": 2.0,
    # Seconds reads skip the sidecar (and use the stored table) after it failed; 0 disables.
    "READ_FAILURE_COOLDOWN": 2.0,
    # Where browsers reach the live-count stream: the sidecar, or a path of your site proxied to
    # it. None: SIDECAR_URL.
    "STREAM_URL": None,
    # Seconds a stream token minted for a page stays valid (60 to 86400; above 3600, raise the
    # sidecar's --max-stream-token-secs to match, or it refuses the tokens). An open stream outlives
    # it; a reconnect after it needs a fresh token (live.js asks the stream-url view for one).
    "STREAM_TOKEN_TTL": 3600,
    # Wrap MODEL's managers at start-up so their querysets' update(), bulk_create() and
    # bulk_update() tell the sidecar: a third-party app's own bulk methods are then counted.
    "TRACK_BULK_WRITES": False,
    # For a host project's test suite: nothing is sent, reads count the notification table with
    # the ORM, the admin calls answer without a sidecar, and migrate creates the count table.
    "TEST_MODE": False,
}


def user_settings() -> Mapping[str, Any]:
    """The ``COUNTERSINK`` dict as configured (empty if absent)."""
    value = getattr(django_settings, SETTING, None)
    return value if isinstance(value, Mapping) else {}


_values_cache: dict[str, Any] | None = None


def get(key: str) -> Any:
    """One setting, with its default."""
    global _values_cache
    values = _values_cache
    if values is None:
        values = {**DEFAULTS, **{k: v for k, v in user_settings().items() if k in DEFAULTS}}
        _values_cache = values
    return values[key]


class _Settings:
    """Typed, lazy access: ``app_settings.SIDECAR_URL`` reads the setting now."""

    @property
    def ENABLED(self) -> bool:
        return bool(get("ENABLED"))

    @property
    def SIDECAR_URL(self) -> str:
        return str(get("SIDECAR_URL")).rstrip("/")

    @property
    def WEBHOOK_SECRET(self) -> str | None:
        value = get("WEBHOOK_SECRET")
        return str(value) if value else None

    @property
    def ADMIN_TOKEN(self) -> str | None:
        value = get("ADMIN_TOKEN")
        return str(value) if value else None

    @property
    def READ_TOKEN(self) -> str | None:
        value = get("READ_TOKEN")
        return str(value) if value else None

    @property
    def CONNECT_TIMEOUT(self) -> float:
        return float(get("CONNECT_TIMEOUT"))

    @property
    def SEND_TIMEOUT(self) -> float:
        return float(get("SEND_TIMEOUT"))

    @property
    def SEND_LINGER(self) -> float:
        return float(get("SEND_LINGER"))

    @property
    def READ_TIMEOUT(self) -> float:
        return float(get("READ_TIMEOUT"))

    @property
    def ADMIN_TIMEOUT(self) -> float:
        return float(get("ADMIN_TIMEOUT"))

    @property
    def QUEUE_SIZE(self) -> int:
        return int(get("QUEUE_SIZE"))

    @property
    def MAX_RETRIES(self) -> int:
        return int(get("MAX_RETRIES"))

    @property
    def RETRY_BACKOFF(self) -> float:
        return float(get("RETRY_BACKOFF"))

    @property
    def RETRY_BACKOFF_MAX(self) -> float:
        return float(get("RETRY_BACKOFF_MAX"))

    @property
    def SHUTDOWN_TIMEOUT(self) -> float:
        return float(get("SHUTDOWN_TIMEOUT"))

    @property
    def READ_FAILURE_COOLDOWN(self) -> float:
        return float(get("READ_FAILURE_COOLDOWN"))

    @property
    def STREAM_URL(self) -> str:
        value = get("STREAM_URL")
        return str(value).rstrip("/") if value else self.SIDECAR_URL

    @property
    def STREAM_TOKEN_TTL(self) -> int:
        return int(get("STREAM_TOKEN_TTL"))

    @property
    def TRACK_BULK_WRITES(self) -> bool:
        return bool(get("TRACK_BULK_WRITES"))

    @property
    def TEST_MODE(self) -> bool:
        return bool(get("TEST_MODE"))


#: Lazy, typed access to the settings.
app_settings = _Settings()


@dataclass(frozen=True)
class ModelMapping:
    """How the configured notification model maps onto events, resolved once."""

    model: type[models.Model]
    #: Attribute holding the recipient's id (``recipient_id``): reading it never queries.
    recipient_attname: str
    recipient_name: str
    read_state_attname: str
    unread_when: bool
    soft_delete_attname: str | None
    #: Whether the soft-delete field is a boolean (else a nullable date/time: set means deleted).
    soft_delete_is_bool: bool
    #: Field names and attnames whose change can change a count (for ``update_fields``).
    tracked_fields: frozenset[str]

    def is_unread(self, instance: models.Model) -> bool:
        """Whether ``instance`` counts as unread by its read-state field (deletion aside)."""
        return bool(getattr(instance, self.read_state_attname)) is self.unread_when

    def unread_lookups(self) -> dict[str, Any]:
        """ORM lookups selecting unread, not soft-deleted notifications (of any user)."""
        lookups: dict[str, Any] = {self.read_state_attname: self.unread_when}
        if self.soft_delete_attname is not None:
            if self.soft_delete_is_bool:
                lookups[self.soft_delete_attname] = False
            else:
                lookups[f"{self.soft_delete_attname}__isnull"] = True
        return lookups

    def is_soft_deleted(self, instance: models.Model) -> bool:
        """Whether ``instance`` is soft-deleted (a truthy soft-delete field)."""
        attname = self.soft_delete_attname
        return attname is not None and bool(getattr(instance, attname))


class MappingError(Exception):
    """The model settings do not resolve; the system checks say how to fix it."""


_mapping_lock = threading.Lock()
_mapping_cache: ModelMapping | None = None


def mapping() -> ModelMapping:
    """The resolved model mapping; raises :class:`MappingError` when misconfigured."""
    global _mapping_cache
    cached = _mapping_cache
    if cached is not None:
        return cached
    resolved = resolve_mapping(user_settings())
    with _mapping_lock:
        _mapping_cache = resolved
    return resolved


def resolve_mapping(values: Mapping[str, Any]) -> ModelMapping:
    """Resolves ``MODEL`` and the field settings against the app registry."""
    from django.apps import apps
    from django.core.exceptions import FieldDoesNotExist

    label = values.get("MODEL", DEFAULTS["MODEL"])
    if not isinstance(label, str) or label.count(".") != 1:
        raise MappingError(f"MODEL must be 'app_label.ModelName', got {label!r}")
    try:
        model = apps.get_model(label)
    except (LookupError, ValueError) as e:
        raise MappingError(f"MODEL {label!r} is not an installed model ({e})") from e

    def field(key: str) -> models.Field[Any, Any]:
        name = values.get(key, DEFAULTS[key])
        if not isinstance(name, str):
            raise MappingError(f"{key} must be a field name, got {name!r}")
        try:
            found = model._meta.get_field(name)
        except FieldDoesNotExist as e:
            raise MappingError(f"{key}: {label} has no field {name!r}") from e
        if not isinstance(found, models.Field) or not found.concrete:
            raise MappingError(f"{key}: {label}.{name} is not a concrete field")
        return found

    recipient = field("RECIPIENT_FIELD")
    read_state = field("READ_STATE_FIELD")
    unread_when = values.get("UNREAD_WHEN", DEFAULTS["UNREAD_WHEN"])
    if not isinstance(unread_when, bool):
        raise MappingError(f"UNREAD_WHEN must be True or False, got {unread_when!r}")
    soft_delete = field("SOFT_DELETE_FIELD") if values.get("SOFT_DELETE_FIELD") else None
    tracked = {recipient.name, recipient.attname, read_state.name, read_state.attname}
    if soft_delete is not None:
        tracked |= {soft_delete.name, soft_delete.attname}
    return ModelMapping(
        model=model,
        recipient_attname=recipient.attname,
        recipient_name=recipient.name,
        read_state_attname=read_state.attname,
        unread_when=unread_when,
        soft_delete_attname=soft_delete.attname if soft_delete is not None else None,
        soft_delete_is_bool=isinstance(soft_delete, models.BooleanField),
        tracked_fields=frozenset(tracked),
    )


def _reset(*, setting: str, **kwargs: Any) -> None:
    global _mapping_cache, _values_cache
    if setting == SETTING:
        with _mapping_lock:
            _values_cache = None
            _mapping_cache = None


setting_changed.connect(_reset, dispatch_uid="countersink.conf.reset")
