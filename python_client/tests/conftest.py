"""The test session: pytest-django's test database, and the real sidecar pointed at it
(the fixtures live in ``sidecar_fixtures.py``, shared with ``tests_hq/``)."""

from __future__ import annotations

from sidecar_fixtures import live_sidecar, pytest_report_header, sidecar

__all__ = ["live_sidecar", "pytest_report_header", "sidecar"]
