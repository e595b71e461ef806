"""The sidecar fixtures, shared by the test project's suite (tests/) and the
django-notifications-hq suite (tests_hq/): each conftest imports them.

``sidecar`` (session) starts ``$COUNTERSINK_BIN`` (default ``../target/debug/countersink``)
on a free port, with a Redis prefix unique to this run and xdist worker, ``--flush-cron off``,
and the URL of the test database pytest-django created; it waits for ``/healthz``, points
``COUNTERSINK['SIDECAR_URL']`` at it, and at the end stops it and deletes its Redis keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connections
from django.test.utils import override_settings
from sidecar import Sidecar, binary_path, feature_flags, missing_flags

import countersink
from countersink import reads

REDIS_URL = os.environ.get("COUNTERSINK_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def pytest_report_header(config: pytest.Config) -> list[str]:
    binary = binary_path()
    if not binary.exists():
        return [f"countersink sidecar: {binary} (missing: run cargo build)"]
    wanted = feature_flags(settings.TEST_WEBHOOK_SECRET, settings.TEST_ADMIN_TOKEN, settings.TEST_READ_TOKEN)
    missing = missing_flags(binary, wanted)
    return [f"countersink sidecar: {binary}", f"sidecar flags not available yet: {', '.join(missing) or 'none'}"]


def database_url(settings_dict: dict[str, object]) -> str:
    """A postgres:// URL for Django's connection settings."""
    user = quote(str(settings_dict.get("USER") or "postgres"), safe="")
    password = settings_dict.get("PASSWORD")
    auth = f"{user}:{quote(str(password), safe='')}" if password else user
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or "5432"
    return f"postgres://{auth}@{host}:{port}/{quote(str(settings_dict['NAME']), safe='')}"


@pytest.fixture(scope="session")
def sidecar(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Iterator[Sidecar]:
    binary = binary_path()
    if not binary.exists():
        pytest.fail(f"no sidecar binary at {binary}: run `cargo build` in the repository root or set COUNTERSINK_BIN")
    # django_db_setup has switched NAME to the test database, e.g. test_countersink_<run>_gw0.
    db_url = database_url(connections["default"].settings_dict)
    process = Sidecar(
        binary,
        database_url=db_url,
        redis_url=REDIS_URL,
        redis_prefix=f"cstest-{settings.RUN_ID}-{worker_id}",
        log_path=tmp_path_factory.mktemp("sidecar") / "sidecar.log",
        wanted_flags={
            **feature_flags(settings.TEST_WEBHOOK_SECRET, settings.TEST_ADMIN_TOKEN, settings.TEST_READ_TOKEN),
            # A suite's own extra flags, e.g. a short flush-lock lease for a SIGKILL test.
            **getattr(settings, "TEST_SIDECAR_FLAGS", {}),
        },
    )
    process.start()
    override = override_settings(COUNTERSINK={**settings.COUNTERSINK, "SIDECAR_URL": process.url})
    override.enable()
    try:
        yield process
    finally:
        countersink.wait_until_sent(5)
        override.disable()
        process.stop()
        process.delete_redis_keys()


@pytest.fixture
def live_sidecar(sidecar: Sidecar) -> Iterator[Sidecar]:
    """The sidecar, running (a failed outage test may have left it stopped), with an idle sender."""
    sidecar.start()
    assert countersink.wait_until_sent(15), "events of an earlier test are still unsent"
    reads.reset_read_cooldown()
    yield sidecar
    sidecar.start()
    countersink.wait_until_sent(15)
