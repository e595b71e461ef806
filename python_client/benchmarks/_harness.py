"""What both benchmarks stand on: a throw-away test database and the real sidecar on it.

Imported after ``django.setup()`` by ``read_latency.py`` and ``save_overhead.py`` (which put
``tests/`` on ``sys.path`` for the ``sidecar`` helper the test suite uses).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import connections
from django.test.utils import setup_databases, teardown_databases
from sidecar import Sidecar, binary_path, feature_flags


@contextmanager
def sidecar_on_test_database(tag: str) -> Iterator[Sidecar]:
    """A test database, the sidecar started on it under a Redis prefix of this process; both
    removed (and the sidecar's keys deleted) on the way out."""
    old_config = setup_databases(verbosity=0, interactive=False)
    db = connections["default"].settings_dict
    sidecar = Sidecar(
        binary_path(),
        database_url=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        redis_url=os.environ.get("COUNTERSINK_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
        redis_prefix=f"{tag}-{os.getpid()}",
        log_path=Path(f"/tmp/countersink-{tag}-{os.getpid()}.log"),
        wanted_flags=feature_flags(settings.TEST_WEBHOOK_SECRET, settings.TEST_ADMIN_TOKEN, settings.TEST_READ_TOKEN),
    )
    sidecar.start()
    try:
        yield sidecar
    finally:
        sidecar.stop()
        sidecar.delete_redis_keys()
        teardown_databases(old_config, verbosity=0)
