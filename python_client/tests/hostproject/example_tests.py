"""A host project's own tests, written as for any Django app, with countersink in TEST_MODE."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.template import Context, Template
from testproject.notifications.models import Notification

import countersink
from countersink.models import UserNotificationsCount

pytestmark = pytest.mark.django_db  # plain TestCase-style transactions: no sidecar to see commits


def test_counts_are_exact_at_once_inside_the_test_transaction(countersink_wait) -> None:  # type: ignore[no-untyped-def]
    user = get_user_model().objects.create(username="host")
    Notification.objects.bulk_create([Notification(recipient=user) for _ in range(3)])
    Notification.objects.create(recipient=user, deleted=True)
    assert countersink.unread_count(user) == 3
    Notification.objects.filter(recipient=user).update(unread=False)  # no helper needed here
    countersink_wait()  # returns at once in test mode
    assert countersink.unread_counts([user]) == {user.pk: 0}
    template = Template("{% load countersink_tags %}[{% unread_count u %}]{% unread_badge u %}")
    assert template.render(Context({"u": user})) == "[0]"


def test_the_count_table_exists_and_the_commands_answer() -> None:
    assert UserNotificationsCount.objects.count() == 0
    out = StringIO()
    call_command("countersink_flush", stdout=out)
    call_command("countersink_status", stdout=out)
    assert countersink.stats()["requests"] == 0, "nothing was sent"
