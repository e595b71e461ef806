"""Recounts: which users an un-soft-delete recounts, what stats() counts, wait_for_recounts()."""

from __future__ import annotations

import time

import pytest
from django.db import transaction
from helpers import assert_counts_exact, live, make_user, notify
from testproject.notifications.models import Notification

import countersink
from countersink import api

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]


def test_un_soft_delete_recounts_only_its_own_user() -> None:
    owner, bystander = make_user(), make_user()
    (note,) = notify(owner, 1, deleted=True)
    (other,) = notify(bystander, 1)
    assert live(owner) == 0
    before = countersink.stats()
    with transaction.atomic():
        loaded = Notification.objects.get(pk=note.pk)  # loaded soft-deleted
        loaded.deleted = False
        loaded.save()
        other.text = "edited"
        other.save()  # an unread save of another user in the same request
    assert countersink.wait_for_recounts(10)
    after = countersink.stats()
    assert after["recounts_sent"] - before["recounts_sent"] == 1, "only the owner is recounted"
    assert after["after_delete_recounts"] == before["after_delete_recounts"]
    assert live(owner) == 1
    assert live(bystander) == 1
    assert_counts_exact()


def test_un_soft_delete_of_an_instance_never_loaded_recounts_only_unread_savers() -> None:
    owner, reader = make_user(), make_user()
    (note,) = notify(owner, 1, deleted=True)
    (read,) = notify(reader, 1, unread=False)
    assert live(owner) == 0
    before = countersink.stats()
    with transaction.atomic():
        # Built, not loaded: the receiver cannot tell it was deleted; the sidecar's answer does.
        Notification(pk=note.pk, recipient_id=owner.pk, unread=True, deleted=False, text="x").save()
        read.text = "edited"
        read.save()  # a read notification: counts 0 whatever the sidecar thinks of it
    assert countersink.wait_for_recounts(10)
    after = countersink.stats()
    assert after["after_delete_recounts"] - before["after_delete_recounts"] == 1
    assert live(owner) == 1
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
