"""Either polarity of the read-state field: `unread=True` or `is_read=False` means unread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import connection
from django.db.models.signals import post_delete, post_save
from django.test import override_settings
from helpers import live, make_user, settle
from testproject.notifications.models import Alert

from countersink import conf, receivers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]


@pytest.fixture
def alerts_configured() -> Iterator[None]:
    """COUNTERSINK pointed at Alert (is_read, UNREAD_WHEN=False), its receivers connected."""
    values = {
        **conf.user_settings(),
        "MODEL": "notifications.Alert",
        "RECIPIENT_FIELD": "user",
        "READ_STATE_FIELD": "is_read",
        "UNREAD_WHEN": False,
        "SOFT_DELETE_FIELD": None,
    }
    # The sidecar keys state by notification id alone: keep Alert ids clear of Notification ids.
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval(pg_get_serial_sequence('notifications_alert', 'id'), 4000000000000)")
    with override_settings(COUNTERSINK=values):
        receivers.connect()
        try:
            yield
        finally:
            settle()
            post_save.disconnect(sender=Alert, dispatch_uid="countersink.notifications.alert.post_save")
            post_delete.disconnect(sender=Alert, dispatch_uid="countersink.notifications.alert.post_delete")


@pytest.mark.usefixtures("alerts_configured")
def test_is_read_false_counts_as_unread() -> None:
    user = make_user()
    first = Alert.objects.create(user=user)
    Alert.objects.create(user=user, is_read=True)
    assert live(user) == 1
    first.is_read = True
    first.save()
    assert live(user) == 0
    first.is_read = False
    first.save()
    assert live(user) == 1
    first.delete()
    assert live(user) == 0
