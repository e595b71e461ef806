"""A mixed, concurrent workload ends with every user's count equal to the ORM's count."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest
from django.core.exceptions import ObjectDoesNotExist
from django.db import DatabaseError, connection, transaction
from helpers import assert_counts_exact, make_users
from sidecar import Sidecar
from testproject.notifications.models import Notification

import countersink

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]

THREADS = 4
STEPS = 60


class Rollback(Exception):
    pass


def signal_step(rng: random.Random, user_ids: list[int]) -> None:
    """One change through save()/delete() or the bulk helpers that need no recount."""
    uid = rng.choice(user_ids)
    mine = list(Notification.objects.filter(recipient_id=uid).values_list("pk", flat=True)[:20])
    roll = rng.random()
    if roll < 0.30 or not mine:
        Notification.objects.create(recipient_id=uid, unread=rng.random() < 0.8)
    elif roll < 0.50:
        note = Notification.objects.get(pk=rng.choice(mine))
        note.unread = not note.unread
        note.save()
    elif roll < 0.58:
        Notification.objects.filter(pk=rng.choice(mine)).delete()
    elif roll < 0.66:
        note = Notification.objects.get(pk=rng.choice(mine))
        note.deleted = True
        note.save(update_fields=["deleted"])
    elif roll < 0.76:
        countersink.bulk_create([Notification(recipient_id=rng.choice(user_ids)) for _ in range(rng.randint(1, 4))])
    elif roll < 0.86:
        notes = list(Notification.objects.filter(pk__in=mine[:5]))
        for note in notes:
            note.unread = rng.random() < 0.5
        countersink.bulk_update(notes, ["unread"])
    else:
        # A transaction with a savepoint that rolls back.
        with transaction.atomic():
            Notification.objects.create(recipient_id=uid)
            try:
                with transaction.atomic():
                    Notification.objects.create(recipient_id=uid)
                    Notification.objects.filter(pk=rng.choice(mine)).delete()
                    raise Rollback
            except Rollback:
                pass


def bulk_step(rng: random.Random, user_ids: list[int]) -> None:
    """Signal steps mixed with the paths that need the sidecar's recount."""
    uid = rng.choice(user_ids)
    roll = rng.random()
    if roll < 0.15:
        countersink.mark_all_read(uid)
    elif roll < 0.25:
        Notification.tracked.filter(recipient_id=uid, unread=False).update(unread=True)
    else:
        signal_step(rng, user_ids)


def run_workload(
    step: Callable[[random.Random, list[int]], None], *, shared: bool, restart: Sidecar | None = None
) -> None:
    """``THREADS`` threads run ``STEPS`` steps each, over 3 users per thread.

    With ``shared``, every thread works on every user, so a save can race a delete of the same
    row (Django's save() then re-inserts it, which only a recount repairs); otherwise each
    thread has its own users.
    """
    user_ids = [u.pk for u in make_users(3 * THREADS, "mixed")]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        rng = random.Random(1000 + index)
        mine = user_ids if shared else user_ids[3 * index : 3 * index + 3]
        try:
            for _ in range(STEPS):
                try:
                    step(rng, mine)
                except (ObjectDoesNotExist, DatabaseError):
                    if not shared:
                        raise
                    # Another thread deleted the row this step was about to change.
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    if restart is not None:
        restart.stop()
        restart.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_mixed_concurrent_workload_ends_with_every_count_exact(live_sidecar: Sidecar) -> None:
    dropped_before = countersink.stats()["events_dropped"]
    run_workload(signal_step, shared=False, restart=live_sidecar)
    assert_counts_exact()
    assert countersink.stats()["events_dropped"] == dropped_before


def test_mixed_workload_with_bulk_updates_and_racing_deletes_ends_with_every_count_exact() -> None:
    run_workload(bulk_step, shared=True)
    assert_counts_exact()
