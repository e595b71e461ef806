"""TRACK_BULK_WRITES on the test project's plain ``objects`` manager (a model "you do not own").

django-notifications-hq's own methods, views and admin are tested in ``tests_hq/``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import models
from helpers import assert_counts_exact, live, make_user, notify
from testproject.notifications.models import Notification, ProxyNotification

import countersink
from countersink import managers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]


@pytest.fixture
def tracked() -> Iterator[None]:
    """Wraps the managers as ``ready()`` does with the setting, and unwraps them afterwards."""
    saved = {
        (model, manager.name): manager.__class__
        for model in (Notification, ProxyNotification)
        for manager in model._meta.managers
    }
    wrapped = countersink.track_bulk_writes("notifications.Notification")
    assert "notifications.Notification.objects" in wrapped
    yield
    for model in (Notification, ProxyNotification):
        for manager in model._meta.managers:
            manager.__class__ = saved[(model, manager.name)]
        managers._forget_related_managers(model)


def test_plain_update_is_not_counted_without_the_setting() -> None:
    user = make_user()
    notify(user, 2)
    Notification.objects.filter(recipient=user).update(unread=False)
    assert countersink.wait_for_recounts(10)
    assert live(user) == 2  # the documented gap TRACK_BULK_WRITES closes


@pytest.mark.usefixtures("tracked")
def test_update_through_the_default_manager_is_counted() -> None:
    user = make_user()
    notify(user, 3)
    Notification.objects.filter(recipient=user).update(unread=False)
    assert countersink.wait_for_recounts(10)
    assert live(user) == 0
    assert_counts_exact()


@pytest.mark.usefixtures("tracked")
def test_related_manager_and_proxy_updates_are_counted() -> None:
    user = make_user()
    notify(user, 3)
    user.notifications.filter(unread=True).update(deleted=True)
    assert countersink.wait_for_recounts(10)
    assert live(user) == 0
    ProxyNotification.objects.filter(recipient=user).update(deleted=False)
    assert countersink.wait_for_recounts(10)
    assert live(user) == 3
    assert_counts_exact()


@pytest.mark.usefixtures("tracked")
def test_bulk_create_and_bulk_update_through_the_default_manager_are_counted() -> None:
    user = make_user()
    notes = Notification.objects.bulk_create([Notification(recipient=user) for _ in range(4)])
    assert live(user) == 4
    for note in notes[:3]:
        note.unread = False
    Notification.objects.bulk_update(notes, ["unread"])
    assert live(user) == 1
    assert_counts_exact()


@pytest.mark.usefixtures("tracked")
def test_queryset_delete_is_counted_by_the_receivers() -> None:
    user = make_user()
    notes = notify(user, 3)
    Notification.objects.filter(pk__in=[n.pk for n in notes[:2]]).delete()
    assert live(user) == 1
    assert_counts_exact()


@pytest.mark.usefixtures("tracked")
def test_wrapping_twice_changes_nothing_and_keeps_the_names() -> None:
    assert countersink.track_bulk_writes("notifications.Notification") == []
    manager = Notification.objects
    assert managers.is_tracked(manager)
    assert type(manager).__name__ == "Manager"
    assert type(manager.get_queryset()).__name__ == "QuerySet"
    # Other models keep Django's own classes.
    from django.contrib.auth.models import Group

    assert type(Group.objects.get_queryset()) is models.QuerySet
