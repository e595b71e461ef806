"""Covering a model you do not own: its managers' querysets are wrapped at start-up.

``COUNTERSINK["TRACK_BULK_WRITES"] = True`` (or :func:`track_bulk_writes` in your own
``AppConfig.ready``) makes every manager of ``MODEL`` (and of its proxies) build querysets whose
``update()``, ``bulk_create()`` and ``bulk_update()`` go through :mod:`countersink.bulk`, the same
code :class:`~countersink.CountersinkQuerySet` runs on a model you own. Nothing in the app
changes: django-notifications-hq's ``mark_all_as_read()`` (a ``QuerySet.update()``), its views
(``request.user.notifications.mark_all_as_read()``, a related manager) and its admin action
(``queryset.update(unread=True)``) are all counted.

How, without touching the app's classes:

- each manager *instance* of the model gets a subclass of its own class whose
  ``_queryset_class`` is ``(CountersinkQuerySet, <the app's QuerySet>)``, named like the
  original so migrations serialise it as before; the app's QuerySet class itself, shared with
  other models, is left alone;
- related managers (``user.notifications``) are built by Django from the default manager's
  class, so they follow; any built before the wrap are dropped from Django's cache.

``delete()`` needs no wrapping: Django never fast-deletes a model that has ``post_delete``
receivers, so a queryset delete sends one ``post_delete`` per row, which the receivers count.
The base manager (``_base_manager``) is left alone: Django uses it for ``save()``, which its
``post_save`` already reports, and for internal lookups that write nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from django.apps import apps
from django.db import models

from countersink import conf
from countersink.bulk import CountersinkQuerySet

logger = logging.getLogger("countersink")

#: Wrapped QuerySet classes, by the app's class, so every manager shares one.
_wrapped_querysets: dict[type[models.QuerySet[Any]], type[models.QuerySet[Any]]] = {}


def track_bulk_writes(model: type[models.Model] | str | None = None) -> list[str]:
    """Wraps ``model``'s managers (default: ``MODEL``) so their bulk writes tell the sidecar.

    Call it once at start-up (``AppConfig.ready``); calling it again changes nothing. Returns the
    managers it wrapped now, as ``"app_label.Model.manager_name"``.
    """
    if model is None:
        model = conf.mapping().model
    elif isinstance(model, str):
        model = apps.get_model(model)
    concrete = model._meta.concrete_model
    targets = [m for m in apps.get_models() if m._meta.concrete_model is concrete]
    wrapped: list[str] = []
    for target in targets:
        for manager in target._meta.managers:
            if _wrap(manager):
                wrapped.append(f"{target._meta.label}.{manager.name}")
        _forget_related_managers(target)
    if wrapped:
        logger.debug("countersink: tracking bulk writes of %s", ", ".join(wrapped))
    return wrapped


def _queryset_class(manager: models.Manager[Any]) -> type[models.QuerySet[Any]]:
    # Django's (undocumented, stable since 1.7) attribute: the class get_queryset() builds.
    queryset_class: type[models.QuerySet[Any]] = getattr(manager, "_queryset_class")  # noqa: B009
    return queryset_class


def is_tracked(manager: models.Manager[Any]) -> bool:
    """Whether ``manager``'s querysets tell the sidecar about bulk writes."""
    return issubclass(_queryset_class(manager), CountersinkQuerySet)


def _wrap(manager: models.Manager[Any]) -> bool:
    if is_tracked(manager):
        return False
    queryset_class = _queryset_class(manager)
    wrapped_queryset = _wrapped_querysets.get(queryset_class)
    if wrapped_queryset is None:
        wrapped_queryset = type(
            queryset_class.__name__,
            (CountersinkQuerySet, queryset_class),
            {"__module__": queryset_class.__module__, "__qualname__": queryset_class.__qualname__},
        )
        _wrapped_querysets[queryset_class] = wrapped_queryset
    manager_class = type(manager)
    manager.__class__ = type(
        manager_class.__name__,
        (manager_class,),
        {
            "_queryset_class": wrapped_queryset,
            # Same name and module: migrations (use_in_migrations) still find the app's class.
            "__module__": manager_class.__module__,
            "__qualname__": manager_class.__qualname__,
        },
    )
    return True


def _forget_related_managers(model: type[models.Model]) -> None:
    """Drops related-manager classes Django built from the manager before it was wrapped."""
    for field in model._meta.get_fields():
        remote = getattr(field, "remote_field", None)
        if not getattr(field, "concrete", False) or remote is None or not getattr(field, "many_to_one", False):
            continue
        accessor = remote.get_accessor_name()
        descriptor = remote.model.__dict__.get(accessor) if accessor else None
        if descriptor is not None:
            descriptor.__dict__.pop("related_manager_cls", None)
