"""What can go wrong when talking to the sidecar, as two kinds a caller can act on."""

from __future__ import annotations


class CountersinkError(Exception):
    """Base class of countersink's errors."""


class SidecarUnavailable(CountersinkError):
    """The sidecar could not be reached, timed out, or answered 408/429/5xx: retry later."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class SidecarRejected(CountersinkError):
    """The sidecar answered a 4xx other than 408/429: retrying the same request will not help."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        detail = f"{message} (field {field})" if field else message
        super().__init__(f"HTTP {status} {code}: {detail}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
