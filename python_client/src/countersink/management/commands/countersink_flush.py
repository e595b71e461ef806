"""``manage.py countersink_flush``: write pending deltas into the count table now."""

from __future__ import annotations

from typing import Any

from countersink import api
from countersink.management.base import SidecarCommand


class Command(SidecarCommand):
    help = (
        "Asks the countersink sidecar to flush pending unread-count deltas into "
        "countersink_usernotificationscount now (POST /v1/flush) and prints what it wrote."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        report = self.call_sidecar("flush", api.flush)
        if options["json"]:
            self.write_json(report)
            return
        if report.get("skipped"):
            self.stdout.write(f"Flush skipped: {report['skipped']}")
            return
        batches = report.get("batches") or []
        if not batches:
            self.stdout.write(f"Nothing to flush ({report.get('duration_ms', 0)} ms).")
            return
        self.stdout.write(
            f"Flushed {len(batches)} batch(es): {report.get('users_written', 0)} user(s) written "
            f"in {report.get('duration_ms', 0)} ms."
        )
        for batch in batches:
            notes = []
            if batch.get("recovered"):
                notes.append("recovered from an interrupted flush")
            if batch.get("already_applied"):
                notes.append("already applied, skipped")
            suffix = f" ({'; '.join(notes)})" if notes else ""
            self.stdout.write(
                f"  batch {batch.get('batch_id')}: {batch.get('users', 0)} user(s), "
                f"delta sum {batch.get('delta_sum', 0):+d}{suffix}"
            )
