"""``manage.py countersink_reconcile``: recount users from the notification table."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from countersink import reconcile
from countersink.management.base import EXIT_REJECTED, SidecarCommand


class Command(SidecarCommand):
    help = (
        "Asks the countersink sidecar to recount unread notifications from the notification table "
        "(POST /v1/reconcile) for some users (--user ID ...) or for every user with a notification "
        "or a stored count (--all), repairing what was wrong, and prints the counts that were wrong. "
        "For very large tables, the sidecar's own `countersink reconcile --all` avoids the round trips."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument(
            "--user",
            dest="user_ids",
            type=int,
            nargs="+",
            action="extend",
            metavar="ID",
            help="A user id; repeat or list several.",
        )
        which.add_argument("--all", action="store_true", help="Every user with a notification or a stored count.")

    def handle(self, *args: Any, **options: Any) -> None:
        user_ids: list[int] = options["user_ids"] or []
        if any(u < 0 for u in user_ids):
            raise CommandError("User ids are non-negative integers.", returncode=2)
        verbose = int(options["verbosity"]) >= 2

        def progress(report: dict[str, Any]) -> None:
            if verbose:
                self.stderr.write(f"checked {report['users_checked']} user(s)...")

        users = reconcile.all_user_ids() if options["all"] else iter(sorted(set(user_ids)))
        report = self.call_sidecar("reconcile", lambda: reconcile.reconcile_users(users, progress))
        if options["json"]:
            self.write_json(report)
            return
        checked, drift, unfinished = report["users_checked"], report["drift"], report["unfinished"]
        if not drift:
            self.stdout.write(f"Checked {checked} user(s): every count was right.")
        else:
            self.stdout.write(f"Checked {checked} user(s): {len(drift)} count(s) were wrong and are repaired:")
            for row in drift:
                stored, actual = row.get("stored", 0), row.get("actual", 0)
                self.stdout.write(
                    f"  user {row.get('user_id')}: was {stored}, actually {actual} ({actual - stored:+d})"
                )
        if unfinished:
            raise CommandError(
                f"{len(unfinished)} user(s) were not finished (the sidecar's step took too long): "
                f"run again with --user {' '.join(str(u) for u in unfinished[:50])}",
                returncode=EXIT_REJECTED,
            )
