"""Recounts: saves after a delete (un-soft-deletes, re-inserts), what stats() counts, wait_for_recounts()."""

from __future__ import annotations

import time

import pytest
from django.db import transaction
from helpers import assert_counts_exact, eventually_live, live, make_user, notify, orm_unread
from testproject.notifications.models import Notification

import countersink
from countersink import api

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]


@pytest.mark.parametrize("how", ["loaded", "built"])
def test_an_un_soft_delete_is_recounted_by_the_sidecar(how: str) -> None:
    owner, bystander = make_user(), make_user()
    (note,) = notify(owner, 1, deleted=True)
    (other,) = notify(bystander, 1)
    assert live(owner) == 0
    before = countersink.stats()
    with transaction.atomic():
        if how == "loaded":
            revived = Notification.objects.get(pk=note.pk)
            revived.deleted = False
        else:  # built, not loaded: nothing on the Django side knows it was deleted
            revived = Notification(pk=note.pk, recipient_id=owner.pk, unread=True, deleted=False, text="x")
        revived.save()
        other.text = "edited"
        other.save()  # an unread save of another user in the same request
    assert countersink.wait_for_recounts(10)
    # The sidecar has the notification as deleted: it recounts the owner from the table itself.
    assert countersink.stats()["recounts_sent"] == before["recounts_sent"]
    assert live(owner) == 1
    assert live(bystander) == 1
    assert_counts_exact()


def test_recounts_sent_counts_the_helpers_recounts() -> None:
    users = [make_user(), make_user(), make_user()]
    for user in users:
        notify(user, 2)
    before = countersink.stats()["recounts_sent"]
    countersink.update(Notification.objects.filter(recipient__in=users), unread=False)
    notify(users[0], 1)
    countersink.mark_all_read(users[0])
    countersink.mark_all_read(users[1])  # nothing unread: no row matched, nobody to recount
    assert countersink.wait_for_recounts(10)
    assert countersink.stats()["recounts_sent"] - before == 4
    assert_counts_exact()


def test_wait_for_recounts_returns_once_the_sidecar_recounted() -> None:
    user = make_user()
    notify(user, 3)
    countersink.update(Notification.objects.filter(recipient=user), unread=False)
    assert countersink.wait_for_recounts(10)
    # No polling: the recount has run by the time it returns.
    assert int(api.get_unread_count(user.pk)["unread_count"]) == 0
    status = api.status()
    assert status["recounts_waiting"] == 0
    assert status["recounts_running"] == 0


def test_wait_for_recounts_is_false_when_the_sidecar_is_down(live_sidecar) -> None:  # type: ignore[no-untyped-def]
    live_sidecar.stop()
    started = time.monotonic()
    assert countersink.wait_for_recounts(0.5) is False
    assert time.monotonic() - started < 5


def test_the_pytest_fixture_waits_for_recounts(countersink_wait) -> None:  # type: ignore[no-untyped-def]
    user = make_user()
    notify(user, 2)
    countersink.mark_all_read(user)
    countersink_wait()
    assert int(api.get_unread_count(user.pk)["unread_count"]) == 0


def test_a_delete_raced_by_a_save_is_recounted_beside_another_users_recount() -> None:
    """The reproduction of a CI failure of the racing-delete workload: a save that re-inserts a
    row deleted under it (Django's save() of a loaded instance whose row is gone) reaches the
    sidecar as a save of a deleted notification, in the same request as another user's recount
    and save. The sidecar recounts the saver's user by itself; before, the sender guessed from
    the answer's `after_delete` total, and the other user's save made the guess wrong."""
    racer, bulk = make_user(), make_user()
    (note,) = notify(racer, 1)
    other, _ = notify(bulk, 2)
    assert live(racer) == 1
    with transaction.atomic():
        loaded = Notification.objects.get(pk=note.pk)
        Notification.objects.filter(pk=note.pk).delete()  # another request deletes the row
        loaded.save()  # no row to update: Django inserts it again
        other.text = "edited"
        other.save()  # an ordinary save of the other user ...
        countersink.mark_all_read(bulk)  # ... who is recounted in the same request
    assert orm_unread(racer) == 1
    eventually_live(racer, 1)
    assert_counts_exact()
