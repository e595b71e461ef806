"""Saves and deletes through the ORM's signals reach the real sidecar, after the commit."""

from __future__ import annotations

import pytest
from django.db import transaction
from helpers import assert_counts_exact, live, make_user, notify, orm_unread, settle
from testproject.notifications.models import Notification, ProxyNotification

import countersink

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]


def test_created_unread_notifications_count() -> None:
    user = make_user()
    notify(user, 3)
    assert live(user) == 3
    assert_counts_exact()


def test_created_read_notification_does_not_count() -> None:
    user = make_user()
    notify(user, 1, unread=False)
    assert live(user) == 0
    assert_counts_exact()


def test_marking_read_then_unread_moves_the_count_both_ways() -> None:
    user = make_user()
    first, second = notify(user, 2)
    first.unread = False
    first.save()
    assert live(user) == 1
    first.unread = True
    first.save()
    assert live(user) == 2
    second.unread = False
    second.save(update_fields=["unread"])
    assert live(user) == 1
    assert_counts_exact()


def test_saving_an_unrelated_field_with_update_fields_sends_nothing() -> None:
    user = make_user()
    (note,) = notify(user)
    settle()
    sent = countersink.stats()["events_queued"]
    note.text = "edited"
    note.save(update_fields=["text"])
    settle()
    assert countersink.stats()["events_queued"] == sent
    assert live(user) == 1


def test_deleting_an_unread_notification_decrements() -> None:
    user = make_user()
    first, _ = notify(user, 2)
    first.delete()
    assert live(user) == 1
    assert_counts_exact()


def test_deleting_through_a_queryset_sends_one_delete_per_row() -> None:
    user = make_user()
    notify(user, 4)
    notify(user, 2, unread=False)
    Notification.objects.filter(recipient=user, text__in=["hello 0", "hello 1"]).delete()
    assert live(user) == orm_unread(user) == 2
    assert_counts_exact()


def test_deleting_the_user_cascades_through_the_orm_and_counts() -> None:
    user, other = make_user(), make_user()
    notify(user, 3)
    notify(other, 1)
    user_id = user.pk
    user.delete()
    settle()
    assert countersink.api.get_unread_count(user_id)["unread_count"] == 0
    assert live(other) == 1
    assert_counts_exact()


def test_soft_delete_sends_a_delete() -> None:
    user = make_user()
    first, _ = notify(user, 2)
    first.deleted = True
    first.save()
    assert live(user) == 1
    # Saving a soft-deleted notification again changes nothing.
    first.unread = True
    first.text = "still deleted"
    first.save()
    assert live(user) == 1
    assert_counts_exact()


def test_proxy_model_saves_count() -> None:
    user = make_user()
    ProxyNotification.objects.create(recipient=user)
    assert live(user) == 1
    assert_counts_exact()


def test_events_of_one_transaction_travel_in_one_request() -> None:
    user = make_user()
    settle()
    before = countersink.stats()
    with transaction.atomic():
        notes = notify(user, 5)
        notes[0].unread = False
        notes[0].save()
        notes[1].delete()
    settle()
    after = countersink.stats()
    assert after["requests"] - before["requests"] == 1
    assert after["events_sent"] - before["events_sent"] == 7
    assert live(user) == 3
    assert_counts_exact()


def test_nothing_is_sent_before_the_commit() -> None:
    user = make_user()
    settle()
    with transaction.atomic():
        notify(user, 2)
        settle()
        assert countersink.api.get_unread_count(user.pk)["unread_count"] == 0
    assert live(user) == 2


def test_rolled_back_transaction_sends_nothing() -> None:
    user = make_user()
    settle()
    before = countersink.stats()["events_queued"]
    with pytest.raises(RuntimeError), transaction.atomic():
        notify(user, 3)
        raise RuntimeError("roll back")
    settle()
    assert countersink.stats()["events_queued"] == before
    assert live(user) == 0
    assert_counts_exact()


def test_rolled_back_savepoint_drops_only_its_events() -> None:
    user = make_user()
    settle()
    before = countersink.stats()
    with transaction.atomic():
        notify(user, 1)
        with pytest.raises(RuntimeError), transaction.atomic():
            notify(user, 5)
            raise RuntimeError("roll back the savepoint")
        notify(user, 1)
        # A savepoint that commits keeps its events.
        with transaction.atomic():
            notify(user, 1)
    settle()
    after = countersink.stats()
    assert after["events_sent"] - before["events_sent"] == 3
    assert after["requests"] - before["requests"] == 1
    assert live(user) == 3
    assert_counts_exact()


def test_rollback_of_an_outer_savepoint_drops_inner_committed_savepoints() -> None:
    user = make_user()
    with transaction.atomic():
        notify(user, 1)
        with pytest.raises(RuntimeError), transaction.atomic():
            with transaction.atomic():
                notify(user, 2)
            notify(user, 4)
            raise RuntimeError("roll back the outer savepoint")
    assert live(user) == 1
    assert_counts_exact()


def test_get_or_create_inside_a_transaction_counts_once() -> None:
    user = make_user()
    with transaction.atomic():
        Notification.objects.get_or_create(recipient=user, text="only once")
        Notification.objects.get_or_create(recipient=user, text="only once")
    assert live(user) == 1
    assert_counts_exact()
