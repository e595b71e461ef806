"""``UserNotificationsCount``: the table the sidecar writes, read by Django.

Unmanaged: the sidecar creates ``countersink_usernotificationscount`` with its own migrations
and is its only writer. Django reads it, e.g. when the sidecar cannot answer.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class UserNotificationsCount(models.Model):
    """A user's unread count as of the sidecar's last flush.

    ``UserNotificationsCount.objects.get(pk=user_id).unread_count``; for the real-time count
    (flushed + pending) use :func:`countersink.unread_count`.
    """

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        primary_key=True,
        db_constraint=False,
        db_column="user_id",
        related_name="+",
    )
    unread_count = models.BigIntegerField(default=0)

    class Meta:
        managed = False
        db_table = "countersink_usernotificationscount"
        verbose_name = "user notifications count"
        verbose_name_plural = "user notifications counts"

    def __str__(self) -> str:
        return f"user {self.pk}: {self.unread_count} unread"
