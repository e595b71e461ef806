"""The django-notifications-hq suite: the same real sidecar as tests/ (``sidecar_fixtures``)."""

from __future__ import annotations

from sidecar_fixtures import live_sidecar, pytest_report_header, sidecar

__all__ = ["live_sidecar", "pytest_report_header", "sidecar"]
