"""The app config: ``ready()`` connects the receivers and, when asked, wraps ``MODEL``'s managers."""

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
            testing,
        )

        receivers.connect()
        testing.connect()
        if receivers.configured_model() is not None:
            from countersink import conf, managers

            if conf.get("TRACK_BULK_WRITES") is True:
                managers.track_bulk_writes()
