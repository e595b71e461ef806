"""The signal receivers: thin, they turn a save or delete into an event for the collector.

They run on the caller's thread inside ``save()`` / ``delete()``, so they only read attributes
already loaded (``recipient_id``, never ``recipient``) and never raise: an error is logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.apps import apps
from django.db import models
from django.db.models.signals import post_delete, post_save

from countersink import collector, conf
from countersink import events as ev
from countersink.conf import app_settings

logger = logging.getLogger("countersink")


def on_post_save(
    sender: type[models.Model],
    instance: models.Model,
    created: bool,
    using: str,
    update_fields: frozenset[str] | None = None,
    **kwargs: Any,
) -> None:
    """``post_save``: a ``post_save`` event, or ``post_delete`` when the save soft-deletes."""
    try:
        if not app_settings.ENABLED:
            return
        m = conf.mapping()
        if update_fields is not None and not m.tracked_fields.intersection(update_fields):
            # Nothing a count depends on was written; the instance's other values may be stale.
            return
        event = instance_event(m, instance, created, time.time())
        if event is None:
            return
        # An un-soft-delete is an ordinary save: the sidecar, which has the notification as
        # deleted, recounts its user from the table by itself.
        collector.add(event, using)
    except Exception:
        logger.exception("countersink: could not record the save of %s pk=%s", sender.__name__, instance.pk)


def instance_event(m: conf.ModelMapping, instance: models.Model, created: bool, at: float) -> ev.Event | None:
    """The event a save of ``instance`` stands for; ``None`` without a recipient."""
    user_id = getattr(instance, m.recipient_attname)
    if user_id is None:
        return None
    if m.soft_delete_attname is not None and getattr(instance, m.soft_delete_attname):
        return (ev.POST_DELETE, instance.pk, user_id, False, False, at)
    unread = bool(getattr(instance, m.read_state_attname)) is m.unread_when
    return (ev.POST_SAVE, instance.pk, user_id, unread, created, at)


def on_post_delete(sender: type[models.Model], instance: models.Model, using: str, **kwargs: Any) -> None:
    """``post_delete``: a ``post_delete`` event (queryset deletes and ORM cascades send it too)."""
    try:
        if not app_settings.ENABLED:
            return
        m = conf.mapping()
        user_id = getattr(instance, m.recipient_attname)
        if user_id is None:
            return
        collector.add((ev.POST_DELETE, instance.pk, user_id, False, False, time.time()), using)
    except Exception:
        logger.exception("countersink: could not record the delete of %s pk=%s", sender.__name__, instance.pk)


def configured_model() -> type[models.Model] | None:
    """``MODEL``'s class; ``None`` when it is missing or wrong (the system checks say so)."""
    label = conf.get("MODEL")
    if not isinstance(label, str):
        return None
    try:
        return apps.get_model(label)
    except (LookupError, ValueError):
        return None


def connect() -> None:
    """Connects the receivers to ``MODEL`` and its proxy models.

    A missing or wrong ``MODEL`` connects nothing; the system checks say what to fix.
    """
    model = configured_model()
    if model is None:
        return
    senders = [model] + [
        m for m in apps.get_models() if m._meta.proxy and m._meta.concrete_model is model._meta.concrete_model
    ]
    for sender in senders:
        uid = f"countersink.{sender._meta.label_lower}"
        post_save.connect(on_post_save, sender=sender, dispatch_uid=f"{uid}.post_save")
        post_delete.connect(on_post_delete, sender=sender, dispatch_uid=f"{uid}.post_delete")


def disconnect() -> None:
    """Undoes :func:`connect` (for benchmarks and tests)."""
    for sender in apps.get_models():
        uid = f"countersink.{sender._meta.label_lower}"
        post_save.disconnect(sender=sender, dispatch_uid=f"{uid}.post_save")
        post_delete.disconnect(sender=sender, dispatch_uid=f"{uid}.post_delete")
