"""System checks for ``settings.COUNTERSINK``; each problem has a stable id and a fix.

| id               | problem                                                            |
|------------------|--------------------------------------------------------------------|
| countersink.E001 | ``COUNTERSINK`` is not a dict                                      |
| countersink.E002 | an unknown key (a typo)                                            |
| countersink.E003 | ``SIDECAR_URL`` is not an http(s) URL                              |
| countersink.E004 | ``WEBHOOK_SECRET`` is missing or not ``whsec_`` + base64           |
| countersink.E005 | ``MODEL`` is missing, malformed or not installed                  |
| countersink.E006 | ``MODEL``'s primary key is not an integer                          |
| countersink.E007 | ``RECIPIENT_FIELD`` is not a ForeignKey/OneToOneField of ``MODEL`` |
| countersink.E008 | ``READ_STATE_FIELD`` is not a BooleanField of ``MODEL``            |
| countersink.E009 | ``UNREAD_WHEN`` is not True or False                               |
| countersink.E010 | ``SOFT_DELETE_FIELD`` is not a boolean or date/time field          |
| countersink.E011 | a timeout, size or retry setting is out of range                  |
| countersink.E012 | a token is not a string                                            |
| countersink.E013 | ``STREAM_URL`` is not an http(s) URL                               |
| countersink.E014 | ``TRACK_BULK_WRITES`` or ``TEST_MODE`` is not True or False        |
| countersink.W001 | ``ADMIN_TOKEN`` is not set                                         |
| countersink.W002 | ``RECIPIENT_FIELD`` does not point at ``AUTH_USER_MODEL``          |
| countersink.W003 | ``TEST_MODE`` is on (``check --deploy`` only)                      |
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks
from django.core.exceptions import FieldDoesNotExist
from django.db import models

from countersink import signing
from countersink.conf import DEFAULTS, SETTING

_NUMBERS: dict[str, tuple[float, bool]] = {
    # key: (smallest value allowed, must be an integer)
    "CONNECT_TIMEOUT": (0.001, False),
    "SEND_TIMEOUT": (0.001, False),
    "SEND_LINGER": (0, False),
    "READ_TIMEOUT": (0.001, False),
    "ADMIN_TIMEOUT": (0.001, False),
    "QUEUE_SIZE": (1, True),
    "MAX_RETRIES": (0, True),
    "RETRY_BACKOFF": (0, False),
    "RETRY_BACKOFF_MAX": (0, False),
    "SHUTDOWN_TIMEOUT": (0, False),
    "READ_FAILURE_COOLDOWN": (0, False),
    "STREAM_TOKEN_TTL": (60, True),
}

#: The longest-lived stream token any sidecar accepts, in seconds (its --max-stream-token-secs
#: is at most this; 3600 by default).
MAX_STREAM_TOKEN_TTL = 86_400


def _error(id_: int, msg: str, hint: str) -> checks.Error:
    return checks.Error(msg, hint=hint, id=f"countersink.E{id_:03d}")


def _warning(id_: int, msg: str, hint: str) -> checks.Warning:
    return checks.Warning(msg, hint=hint, id=f"countersink.W{id_:03d}")


@checks.register()
def check_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Checks ``settings.COUNTERSINK``."""
    values = getattr(settings, SETTING, None)
    if not isinstance(values, dict):
        return [
            _error(
                1,
                f"settings.{SETTING} must be a dict, got {type(values).__name__}.",
                f"Add {SETTING} = {{'MODEL': 'app_label.Notification', 'WEBHOOK_SECRET': 'whsec_...'}} "
                "to your settings (see the countersink README).",
            )
        ]
    errors: list[checks.CheckMessage] = []
    errors += _check_keys(values)
    errors += _check_connection(values)
    errors += _check_numbers(values)
    errors += _check_model(values)
    errors += _check_flags(values)
    return errors


def _check_flags(values: dict[str, Any]) -> list[checks.CheckMessage]:
    return [
        _error(
            14,
            f"{SETTING}[{key!r}] must be True or False, got {values[key]!r}.",
            "Use a bool (a string like 'false' would count as on).",
        )
        for key in ("TRACK_BULK_WRITES", "TEST_MODE")
        if key in values and not isinstance(values[key], bool)
    ]


@checks.register(checks.Tags.security, deploy=True)
def check_deploy(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check --deploy``: test mode left on sends nothing to the sidecar."""
    values = getattr(settings, SETTING, None)
    if isinstance(values, dict) and values.get("TEST_MODE") is True:
        return [
            _warning(
                3,
                f"{SETTING}['TEST_MODE'] is on: no event reaches the sidecar and reads count the table.",
                "Set TEST_MODE only in your test settings.",
            )
        ]
    return []


def _check_keys(values: dict[str, Any]) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for key in values:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), list(DEFAULTS), n=1)
            hint = f"Did you mean {close[0]!r}?" if close else f"Known keys: {', '.join(sorted(DEFAULTS))}."
            errors.append(_error(2, f"{SETTING} has an unknown key {key!r}.", hint))
    return errors


def _check_connection(values: dict[str, Any]) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    url = values.get("SIDECAR_URL", DEFAULTS["SIDECAR_URL"])
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        errors.append(
            _error(
                3,
                f"{SETTING}['SIDECAR_URL'] must be an http:// or https:// URL, got {url!r}.",
                "Use the address the sidecar listens on (its --listen flag), e.g. 'http://127.0.0.1:7878'.",
            )
        )
    secret = values.get("WEBHOOK_SECRET")
    if values.get("TEST_MODE") is True and not secret:
        pass  # test mode signs nothing
    elif not secret:
        errors.append(
            _error(
                4,
                f"{SETTING}['WEBHOOK_SECRET'] is not set.",
                "Set it to the sidecar's signing secret ('whsec_' + base64 of 24 to 64 random bytes), "
                "e.g. from: python -c \"import base64,os; print('whsec_'+base64.b64encode(os.urandom(32)).decode())\"",
            )
        )
    else:
        try:
            secret_key = signing.decode_secret(secret if isinstance(secret, str) else repr(secret))
            if len(secret_key) < signing.MIN_KEY_BYTES:
                raise signing.InvalidSecret(
                    f"it holds {len(secret_key)} bytes; the sidecar refuses fewer than {signing.MIN_KEY_BYTES}"
                )
        except signing.InvalidSecret as e:
            errors.append(
                _error(
                    4,
                    f"{SETTING}['WEBHOOK_SECRET'] is not a valid secret: {e}.",
                    "Use the same 'whsec_...' value the sidecar was started with (24 to 64 random bytes).",
                )
            )
    stream_url = values.get("STREAM_URL")
    stream_parts = urlsplit(stream_url) if isinstance(stream_url, str) else None
    if stream_url is not None and (
        stream_parts is None or stream_parts.scheme not in ("http", "https") or not stream_parts.hostname
    ):
        errors.append(
            _error(
                13,
                f"{SETTING}['STREAM_URL'] must be an http:// or https:// URL, got {stream_url!r}.",
                "Use the address browsers reach the sidecar at (or a path of your site proxied to it), "
                "or remove it to use SIDECAR_URL.",
            )
        )
    for key in ("ADMIN_TOKEN", "READ_TOKEN"):
        token = values.get(key)
        if token is not None and not isinstance(token, str):
            errors.append(_error(12, f"{SETTING}[{key!r}] must be a string.", "Use the token the sidecar was given."))
    if not values.get("ADMIN_TOKEN"):
        errors.append(
            _warning(
                1,
                f"{SETTING}['ADMIN_TOKEN'] is not set.",
                "countersink_flush, countersink_reconcile and countersink_status will be refused by a "
                "sidecar that requires its admin token; set ADMIN_TOKEN to the same value.",
            )
        )
    return errors


def _check_numbers(values: dict[str, Any]) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for key, (minimum, integer) in _NUMBERS.items():
        value = values.get(key, DEFAULTS[key])
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
            what = "an integer" if integer else "a number"
            errors.append(
                _error(
                    11,
                    f"{SETTING}[{key!r}] must be {what} >= {minimum}, got {value!r}.",
                    f"Remove it to use the default ({DEFAULTS[key]!r}).",
                )
            )
    ttl = values.get("STREAM_TOKEN_TTL", DEFAULTS["STREAM_TOKEN_TTL"])
    if isinstance(ttl, int) and ttl > MAX_STREAM_TOKEN_TTL:
        errors.append(
            _error(
                11,
                f"{SETTING}['STREAM_TOKEN_TTL'] must be at most {MAX_STREAM_TOKEN_TTL}, got {ttl!r}.",
                "The sidecar refuses stream tokens that claim to live longer than its "
                "--max-stream-token-secs (3600 by default, at most a day); raise that with this.",
            )
        )
    return errors


def _check_model(values: dict[str, Any]) -> list[checks.CheckMessage]:
    label = values.get("MODEL")
    hint = "Set MODEL to your notification model as 'app_label.ModelName', e.g. 'notifications.Notification'."
    if not isinstance(label, str) or label.count(".") != 1:
        return [_error(5, f"{SETTING}['MODEL'] must be 'app_label.ModelName', got {label!r}.", hint)]
    try:
        model = apps.get_model(label)
    except (LookupError, ValueError):
        return [
            _error(
                5, f"{SETTING}['MODEL'] {label!r} is not an installed model.", hint + " Is its app in INSTALLED_APPS?"
            )
        ]
    errors: list[checks.CheckMessage] = []
    pk = model._meta.pk
    if not isinstance(pk, models.IntegerField):  # AutoField and BigAutoField are IntegerFields
        errors.append(
            _error(
                6,
                f"{label}'s primary key {pk.name if pk else None!r} is not an integer field.",
                "The sidecar keys notifications by integer id (0 to 2**63-1); UUID keys are not supported.",
            )
        )
    errors += _check_recipient(label, model, values.get("RECIPIENT_FIELD", DEFAULTS["RECIPIENT_FIELD"]))
    read_name = values.get("READ_STATE_FIELD", DEFAULTS["READ_STATE_FIELD"])
    read_field = _field(model, read_name)
    if not isinstance(read_field, models.BooleanField):
        errors.append(
            _error(
                8,
                f"{SETTING}['READ_STATE_FIELD'] {read_name!r} is not a BooleanField of {label}.",
                f"Name the boolean field that says whether a notification was read; fields: {_names(model)}.",
            )
        )
    unread_when = values.get("UNREAD_WHEN", DEFAULTS["UNREAD_WHEN"])
    if not isinstance(unread_when, bool):
        errors.append(
            _error(
                9,
                f"{SETTING}['UNREAD_WHEN'] must be True or False, got {unread_when!r}.",
                "True if the field is like `unread` (True = unread), False if it is like `is_read`.",
            )
        )
    soft_name = values.get("SOFT_DELETE_FIELD")
    if soft_name is not None:
        soft_field = _field(model, soft_name)
        if not isinstance(soft_field, (models.BooleanField, models.DateField)):
            errors.append(
                _error(
                    10,
                    f"{SETTING}['SOFT_DELETE_FIELD'] {soft_name!r} is not a boolean or date/time field of {label}.",
                    f"Name the field whose truthy value marks a notification deleted, or remove the key; "
                    f"fields: {_names(model)}.",
                )
            )
    return errors


def _check_recipient(label: str, model: type[models.Model], name: Any) -> list[checks.CheckMessage]:
    field = _field(model, name)
    if not isinstance(field, (models.ForeignKey, models.OneToOneField)):
        return [
            _error(
                7,
                f"{SETTING}['RECIPIENT_FIELD'] {name!r} is not a ForeignKey of {label}.",
                f"Name the ForeignKey to the user who receives the notification; fields: {_names(model)}.",
            )
        ]
    target = field.remote_field.model
    user_model = settings.AUTH_USER_MODEL
    target_label = target if isinstance(target, str) else target._meta.label
    if target_label.lower() != user_model.lower():
        return [
            _warning(
                2,
                f"{label}.{name} points at {target_label}, not AUTH_USER_MODEL ({user_model}).",
                "Counts are keyed by the id this field holds; UserNotificationsCount and unread_count(user) "
                "assume it is the user's id.",
            )
        ]
    return []


def _field(model: type[models.Model], name: Any) -> Any:
    if not isinstance(name, str):
        return None
    try:
        return model._meta.get_field(name)
    except FieldDoesNotExist:
        return None


def _names(model: type[models.Model]) -> str:
    return ", ".join(f.name for f in model._meta.concrete_fields)
