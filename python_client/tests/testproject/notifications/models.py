"""The notification model of the test project, shaped like a third-party app's."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from countersink import CountersinkManager


class Notification(models.Model):
    """A notification: `unread` True means unread; `deleted` is a soft delete."""

    recipient = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    unread = models.BooleanField(default=True)
    deleted = models.BooleanField(default=False)
    text = models.CharField(max_length=200, blank=True)

    # The plain manager first: `objects` behaves like a third-party model's, and
    # `tracked` is the CountersinkQuerySet path for models you own.
    objects = models.Manager()
    tracked = CountersinkManager()

    class Meta:
        indexes = [models.Index(fields=["recipient", "unread"])]


class ProxyNotification(Notification):
    """A proxy: its saves must count too."""

    class Meta:
        proxy = True


class Alert(models.Model):
    """The other polarity: `is_read` False means unread (for UNREAD_WHEN=False)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="alerts")
    is_read = models.BooleanField(default=False)


class UuidNotification(models.Model):
    """Keyed by UUID: not supported (the sidecar keys notifications by integer id)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    recipient = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    group = models.ForeignKey("auth.Group", on_delete=models.CASCADE, null=True, related_name="+")
    unread = models.BooleanField(default=True)
