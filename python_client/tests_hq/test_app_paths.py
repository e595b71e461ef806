"""django-notifications-hq's own methods, views and admin action are counted, with the app
unchanged and one setting (``TRACK_BULK_WRITES``). Each test fails without that setting
(``COUNTERSINK_TEST_OVERRIDES='{"TRACK_BULK_WRITES": false}'``), where the real-time count
stays where it was until a reconcile."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from hqhelpers import live, make_user, send, truth, users_off
from notifications.models import Notification

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]


def test_mark_all_as_read_of_the_app_is_counted() -> None:
    actor, user = make_user(), make_user()
    send(actor, user, 14)
    assert live(user) == 14
    Notification.objects.mark_all_as_read(recipient=user)  # a QuerySet.update() inside the app
    assert truth(user.pk) == 0
    assert live(user) == 0
    assert users_off() == {"realtime": [], "stored": []}


def test_mark_all_as_unread_deleted_and_active_through_the_related_manager_are_counted() -> None:
    actor, user = make_user(), make_user()
    send(actor, user, 5)
    user.notifications.mark_all_as_read()
    assert live(user) == 0
    user.notifications.mark_all_as_unread()
    assert live(user) == 5
    user.notifications.filter(pk__in=list(user.notifications.values_list("pk", flat=True)[:2])).mark_all_as_deleted()
    assert live(user) == 3
    Notification.objects.mark_all_as_active(recipient=user)
    assert live(user) == 5
    assert users_off() == {"realtime": [], "stored": []}


def test_the_apps_views_are_counted() -> None:
    actor, user = make_user(), make_user()
    send(actor, user, 4)
    first, second, third, _ = user.notifications.order_by("pk")
    client = Client()
    client.force_login(user)
    assert client.get(reverse("notifications:mark_as_read", args=[first.slug])).status_code == 302
    assert live(user) == 3
    assert client.get(reverse("notifications:mark_as_unread", args=[first.slug])).status_code == 302
    assert live(user) == 4
    assert client.get(reverse("notifications:delete", args=[second.slug])).status_code == 302  # soft delete
    assert live(user) == 3
    assert client.get(reverse("notifications:mark_all_as_read")).status_code == 302
    assert live(user) == 0
    # The app's own count view agrees with countersink.
    assert client.get(reverse("notifications:live_unread_notification_count")).json() == {"unread_count": 0}
    assert third.pk
    assert users_off() == {"realtime": [], "stored": []}


def test_the_apps_admin_action_is_counted() -> None:
    actor, user = make_user(), make_user()
    send(actor, user, 3)
    user.notifications.mark_all_as_read()
    assert live(user) == 0
    admin = get_user_model().objects.create_superuser("hq-admin", "admin@example.com", "pw")
    client = Client()
    client.force_login(admin)
    ids = [str(pk) for pk in user.notifications.values_list("pk", flat=True)]
    response = client.post(
        reverse("admin:notifications_notification_changelist"),
        {"action": "mark_unread", "_selected_action": ids},
    )
    assert response.status_code == 302
    assert live(user) == 3
    # The admin's delete action deletes rows one post_delete at a time: counted by the receivers.
    response = client.post(
        reverse("admin:notifications_notification_changelist"),
        {"action": "delete_selected", "_selected_action": ids[:2], "post": "yes"},
    )
    assert response.status_code == 302
    assert live(user) == 1
    assert users_off() == {"realtime": [], "stored": []}


def test_a_group_notification_and_a_queryset_delete_are_counted() -> None:
    from django.contrib.auth.models import Group

    actor, a, b = make_user(), make_user(), make_user()
    group = Group.objects.create(name="hq-group")
    group.user_set.add(a, b)
    send(actor, group, 2)  # the app creates one notification per member
    assert (live(a), live(b)) == (2, 2)
    Notification.objects.filter(recipient=a).delete()
    assert live(a) == 0
    assert users_off() == {"realtime": [], "stored": []}
