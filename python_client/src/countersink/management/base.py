"""What the countersink management commands share: calling the sidecar, and clear failures.

Exit codes: 0 done; 1 the sidecar refused the request (bad token, missing feature, busy);
2 wrong arguments; 3 the sidecar is unreachable or unavailable (retry later).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from django.core.management.base import BaseCommand, CommandError, CommandParser

from countersink.conf import app_settings
from countersink.errors import SidecarRejected, SidecarUnavailable

EXIT_REJECTED = 1
EXIT_UNREACHABLE = 3

_T = TypeVar("_T")

_HINTS = {
    401: "Check COUNTERSINK['ADMIN_TOKEN']: it must equal the sidecar's admin token.",
    403: "Check COUNTERSINK['ADMIN_TOKEN']: it must equal the sidecar's admin token.",
    404: "This sidecar version does not offer it; upgrade the sidecar.",
    409: "Another flush is running; try again when it is done.",
}


class SidecarCommand(BaseCommand):
    """A command that talks to the sidecar and turns its failures into CommandErrors."""

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print the sidecar's answer as JSON.")

    def call_sidecar(self, what: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except SidecarUnavailable as e:
            raise CommandError(
                f"Cannot {what}: the countersink sidecar at {app_settings.SIDECAR_URL} is unreachable "
                f"or unavailable ({e}). Is it running, and is COUNTERSINK['SIDECAR_URL'] right?",
                returncode=EXIT_UNREACHABLE,
            ) from e
        except SidecarRejected as e:
            hint = _HINTS.get(e.status, "")
            raise CommandError(
                f"Cannot {what}: the sidecar refused: {e}. {hint}".rstrip(), returncode=EXIT_REJECTED
            ) from e

    def write_json(self, value: Any) -> None:
        self.stdout.write(json.dumps(value, indent=2, sort_keys=True))
