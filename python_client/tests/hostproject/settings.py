"""The example of python_client/README.md, *Your project's tests*: a host project's test
settings with ``TEST_MODE``. No sidecar runs; ``tests/test_test_mode.py`` runs
``example_tests.py`` with these settings in a pytest of its own."""

from __future__ import annotations

import os

from testproject.settings import *  # noqa: F403  (the project's own settings)
from testproject.settings import COUNTERSINK, DATABASES

DATABASES["default"]["TEST"] = {"NAME": f"test_cshost_{os.getpid()}"}

COUNTERSINK = {
    **COUNTERSINK,
    "TEST_MODE": True,  # no sidecar: nothing is sent, reads count the table, migrate makes the count table
    "SIDECAR_URL": "http://127.0.0.1:9",  # nothing listens there: a request would fail the tests
}
del COUNTERSINK["WEBHOOK_SECRET"]  # not needed in test mode (a CI without the production secret)
