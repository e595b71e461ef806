"""The app config: ``ready()`` connects the signal receivers, nothing else."""

from __future__ import annotations

from django.apps import AppConfig


class CountersinkConfig(AppConfig):
    name = "countersink"
    verbose_name = "countersink"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from countersink import (
            checks,  # noqa: F401  (registers the system checks)
            receivers,
        )

        receivers.connect()
