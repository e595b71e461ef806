"""``manage.py countersink_status``: is the sidecar up, what is pending, when did it last flush."""

from __future__ import annotations

from typing import Any

from countersink import api
from countersink.conf import app_settings
from countersink.management.base import SidecarCommand


class Command(SidecarCommand):
    help = (
        "Shows the countersink sidecar's health (GET /healthz), the users with pending deltas, "
        "open flush batches and the last flush (GET /v1/status)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        health = self.call_sidecar("check the sidecar's health", api.health)
        status = self.call_sidecar("read the sidecar's status", api.status)
        if options["json"]:
            self.write_json({"health": health, "status": status})
            return
        self.stdout.write(f"Sidecar: {app_settings.SIDECAR_URL} ({(health or {}).get('status', 'unknown')})")
        self.stdout.write(f"Pending users: {status.get('pending_users', 0)}")
        self.stdout.write(f"Open batches: {status.get('open_batches', 0)}")
        if "recounts_waiting" in status:
            self.stdout.write(f"Recounts waiting: {status['recounts_waiting']}")
        last = status.get("last_flush")
        if last:
            self.stdout.write(
                f"Last flush: batch {last.get('batch_id')} at {last.get('applied_at')} UTC, "
                f"{last.get('users', 0)} user(s), delta sum {last.get('delta_sum', 0):+d}"
            )
        else:
            self.stdout.write("Last flush: never")
