"""Writes that bypass ``post_save`` / ``post_delete``, made visible to the sidecar.

| path                                  | what is sent                                                |
|---------------------------------------|-------------------------------------------------------------|
| ``update()`` touching a tracked field | a ``recount`` per user whose rows matched (learnt first; the |
|                                       | UPDATE changes only those users' rows)                      |
| ``bulk_create()``                     | ``post_save(created=True)`` per row; ``recount`` per user    |
|                                       | when primary keys are unknown (conflict handling, backends) |
| ``bulk_update()`` of tracked fields   | ``post_save`` / ``post_delete`` per object; ``recount`` of   |
|                                       | old and new owners when the recipient changes               |
| raw SQL, database-level cascades      | nothing by itself: call :func:`recount_users`               |

Every path sends after the commit, like the receivers. Models you own get this from
:class:`CountersinkQuerySet` / :data:`CountersinkManager`; a third-party model you cannot
change gets it from the functions :func:`update`, :func:`bulk_create` and :func:`bulk_update`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.db import models, router, transaction

from countersink import collector, conf
from countersink import events as ev
from countersink.conf import app_settings
from countersink.reads import user_id_of
from countersink.receivers import instance_event

logger = logging.getLogger("countersink")

_M = TypeVar("_M", bound=models.Model)


def recount_users(users: Iterable[Any], using: str | None = None) -> set[int]:
    """Asks the sidecar to recount ``users`` (users or ids) from the notification table.

    Sent after the current transaction commits (at once outside a transaction). Use it after
    raw SQL, database-level cascades, or anything else that changes notifications unseen.
    Returns the user ids.
    """
    ids = {uid for uid in (user_id_of(u) for u in users) if uid is not None}
    if ids and app_settings.ENABLED:
        collector.add_many([ev.recount_event(uid) for uid in sorted(ids)], using)
    return ids


def _tracks(model: type[models.Model]) -> conf.ModelMapping | None:
    """The mapping, if ``model`` is the configured notification model and sending is on."""
    if not app_settings.ENABLED:
        return None
    m = conf.mapping()
    return m if model._meta.concrete_model is m.model._meta.concrete_model else None


def _write_db(queryset: models.QuerySet[Any]) -> str:
    """The database ``queryset``'s writes go to, as Django's own ``update()`` asks the router.

    ``queryset.db`` names the *read* database until Django marks the queryset for a write: with a
    replica router, the query, the transaction and the recount would all be on the replica.
    """
    return queryset._db or router.db_for_write(queryset.model, **queryset._hints)


#: Users per UPDATE statement of a tracked ``update()``: well under SQLite's variable limit.
UPDATE_USERS_PER_STATEMENT = 500

#: Runs the untracked ``update(**values)`` of a queryset (the caller's own, or its superclass's).
Updater = Callable[[models.QuerySet[Any], dict[str, Any]], int]


def tracked_update(queryset: models.QuerySet[Any], values: dict[str, Any], do_update: Updater) -> int:
    """``queryset.update(**values)`` via ``do_update``, then a recount of the affected users.

    The users are those of the rows matching before the update (learnt in the same
    transaction), plus the new recipient if the update sets one. The UPDATE itself is limited
    to those users (one statement per ``UPDATE_USERS_PER_STATEMENT``; none if nothing matched):
    under READ COMMITTED it would also change a row another transaction committed after the
    query, and that row's user, never learnt, would never be recounted. Rows of users that had
    no matching row at the query are left alone; a new row of a learnt user may be changed, and
    is recounted with them.
    """
    m = _tracks(queryset.model)
    if m is None or not m.tracked_fields.intersection(values):
        return do_update(queryset, values)
    attname = m.recipient_attname
    db = _write_db(queryset)
    queryset = queryset.using(db)
    with transaction.atomic(using=db, savepoint=False):
        matched: set[Any] = set(queryset.order_by().values_list(attname, flat=True).distinct())
        known = sorted(user for user in matched if user is not None)
        count = 0
        for start in range(0, len(known), UPDATE_USERS_PER_STATEMENT):
            users_here = known[start : start + UPDATE_USERS_PER_STATEMENT]
            count += do_update(queryset.filter(**{f"{attname}__in": users_here}), values)
        if None in matched:
            count += do_update(queryset.filter(**{f"{attname}__isnull": True}), values)
        users = set(known)
        for key in (m.recipient_name, attname):
            if key in values:
                new_owner = values[key]
                if isinstance(new_owner, models.Model):
                    users.add(new_owner.pk)
                elif isinstance(new_owner, int) and not isinstance(new_owner, bool):
                    users.add(new_owner)
                elif new_owner is not None:
                    logger.warning(
                        "countersink: update() set %s to an expression; the new recipients are "
                        "unknown and need recount_users()",
                        key,
                    )
        recount_users(users, using=db)
    return count


def tracked_bulk_create(
    queryset: models.QuerySet[_M],
    objs: Iterable[_M],
    kwargs: dict[str, Any],
    do_bulk_create: Callable[..., list[_M]],
) -> list[_M]:
    """``bulk_create`` via ``do_bulk_create``, then one ``post_save(created=True)`` per row.

    With ``ignore_conflicts`` / ``update_conflicts``, or a backend that does not return primary
    keys, which rows were created is unknown: their users are recounted instead.
    """
    created = do_bulk_create(list(objs), **kwargs)
    m = _tracks(queryset.model)
    if m is None or not created:
        return created
    db = _write_db(queryset)
    if kwargs.get("ignore_conflicts") or kwargs.get("update_conflicts") or any(o.pk is None for o in created):
        recount_users((getattr(o, m.recipient_attname) for o in created), using=db)
        return created
    at = time.time()
    batch = [e for e in (instance_event(m, o, True, at) for o in created) if e is not None]
    collector.add_many(batch, using=db)
    return created


def tracked_bulk_update(
    queryset: models.QuerySet[_M],
    objs: Iterable[_M],
    fields: Iterable[str],
    kwargs: dict[str, Any],
    do_bulk_update: Callable[..., int],
) -> int:
    """``bulk_update`` via ``do_bulk_update``, then the event each object's save would send.

    Changing the recipient recounts the old and the new owners instead.
    """
    objs = list(objs)
    fields = list(fields)
    m = _tracks(queryset.model)
    if m is None or not m.tracked_fields.intersection(fields):
        return do_bulk_update(objs, fields, **kwargs)
    db = _write_db(queryset)
    if m.recipient_name in fields or m.recipient_attname in fields:
        with transaction.atomic(using=db, savepoint=False):
            old_owners = set(
                m.model._base_manager.using(db)
                .filter(pk__in=[o.pk for o in objs])
                .values_list(m.recipient_attname, flat=True)
            )
            count = do_bulk_update(objs, fields, **kwargs)
            recount_users(old_owners | {getattr(o, m.recipient_attname) for o in objs}, using=db)
        return count
    count = do_bulk_update(objs, fields, **kwargs)
    at = time.time()
    batch = [e for e in (instance_event(m, o, False, at) for o in objs) if e is not None]
    collector.add_many(batch, using=db)
    return count


class CountersinkQuerySet(models.QuerySet[_M]):
    """A QuerySet whose ``update``, ``bulk_create`` and ``bulk_update`` tell the sidecar.

    Use it for the notification model if you own it; combine it with your own QuerySet by
    listing it first: ``class MyQuerySet(CountersinkQuerySet, SoftDeleteQuerySet)``.
    """

    def update(self, **kwargs: Any) -> int:
        return tracked_update(self, kwargs, CountersinkQuerySet._untracked_update)

    def _untracked_update(self, values: dict[str, Any]) -> int:
        """The next class's ``update()``, on this (filtered) queryset: ``tracked_update`` calls it
        once per chunk of users, on clones of the queryset ``update()`` was called on."""
        return super().update(**values)

    def bulk_create(self, objs: Iterable[_M], *args: Any, **kwargs: Any) -> list[_M]:
        kwargs.update(zip(_BULK_CREATE_PARAMS, args, strict=False))
        return tracked_bulk_create(self, objs, kwargs, super().bulk_create)

    def bulk_update(self, objs: Iterable[_M], fields: Iterable[str], *args: Any, **kwargs: Any) -> int:
        kwargs.update(zip(_BULK_UPDATE_PARAMS, args, strict=False))
        return tracked_bulk_update(self, objs, fields, kwargs, super().bulk_update)


# Django's positional parameters after `objs` (and `fields`), named so conflicts can be seen.
_BULK_CREATE_PARAMS = ("batch_size", "ignore_conflicts", "update_conflicts", "update_fields", "unique_fields")
_BULK_UPDATE_PARAMS = ("batch_size",)


#: A manager built from :class:`CountersinkQuerySet`: ``objects = CountersinkManager()``.
CountersinkManager = models.Manager.from_queryset(CountersinkQuerySet)


def _queryset_for(model: type[models.Model] | None) -> models.QuerySet[Any]:
    queryset: models.QuerySet[Any] = (model or conf.mapping().model)._default_manager.all()
    return queryset


def update(queryset: models.QuerySet[Any], **values: Any) -> int:
    """``queryset.update(**values)`` for any notification queryset, third-party ones included."""
    if isinstance(queryset, CountersinkQuerySet):
        return queryset.update(**values)
    return tracked_update(queryset, values, lambda queryset, values: queryset.update(**values))


def bulk_create(objs: Iterable[_M], **kwargs: Any) -> list[_M]:
    """``Notification.objects.bulk_create(objs, **kwargs)`` that tells the sidecar."""
    objs = list(objs)
    queryset = _queryset_for(type(objs[0]) if objs else None)
    if isinstance(queryset, CountersinkQuerySet):
        return queryset.bulk_create(objs, **kwargs)
    return tracked_bulk_create(queryset, objs, kwargs, queryset.bulk_create)


def bulk_update(objs: Iterable[_M], fields: Iterable[str], **kwargs: Any) -> int:
    """``Notification.objects.bulk_update(objs, fields, **kwargs)`` that tells the sidecar."""
    objs = list(objs)
    queryset = _queryset_for(type(objs[0]) if objs else None)
    if isinstance(queryset, CountersinkQuerySet):
        return queryset.bulk_update(objs, fields, **kwargs)
    return tracked_bulk_update(queryset, objs, fields, kwargs, queryset.bulk_update)


def mark_all_read(user: Any, using: str | None = None) -> int:
    """Marks every unread notification of ``user`` read in one UPDATE; returns how many.

    Sends one ``recount`` for the user after the commit.
    """
    user_id = user_id_of(user)
    if user_id is None:
        return 0
    m = conf.mapping()
    queryset = m.model._default_manager.all()
    if using is not None:
        queryset = queryset.using(using)
    unread = queryset.filter(**{m.recipient_attname: user_id, m.read_state_attname: m.unread_when})
    return update(unread, **{m.read_state_attname: not m.unread_when})
