"""Settings of the test project: PostgreSQL, the notifications app, countersink.

pytest-django creates the test database; its name is unique per run (and per xdist worker,
which pytest-django suffixes with ``_gw0``...), so runs can overlap and repeat. The sidecar
fixture in ``conftest.py`` points the real sidecar at that same database and replaces
``SIDECAR_URL``.
"""

from __future__ import annotations

import base64
import json
import os
import uuid

# Shared by xdist workers: the controller imports these settings before it starts them.
RUN_ID = os.environ.setdefault("COUNTERSINK_TEST_RUN_ID", uuid.uuid4().hex[:10])

SECRET_KEY = "countersink-tests-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "testproject.urls"
# The browser test loads the example page from the live server on localhost.
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
# The live server's static-files handler needs one (the page inlines live.js, so nothing is served).
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "countersink",
    "testproject.notifications",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PGDATABASE", "test"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "TEST": {"NAME": f"test_countersink_{RUN_ID}"},
    }
}

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [os.path.join(os.path.dirname(__file__), "templates")],
        "APP_DIRS": True,
        "OPTIONS": {},
    }
]

#: Shared with the sidecar the fixture starts (when it accepts these flags).
TEST_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"countersink-test-signing-key-32b").decode()
TEST_ADMIN_TOKEN = "test-admin-token-6f1d2c9a"
TEST_READ_TOKEN = "test-read-token-0b7e4f15"

COUNTERSINK = {
    # Replaced by the sidecar fixture; the variable is for subprocesses of the tests.
    "SIDECAR_URL": os.environ.get("COUNTERSINK_TEST_SIDECAR_URL", "http://127.0.0.1:9"),
    "WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
    "ADMIN_TOKEN": TEST_ADMIN_TOKEN,
    "READ_TOKEN": TEST_READ_TOKEN,
    "MODEL": "notifications.Notification",
    "RECIPIENT_FIELD": "recipient",
    "READ_STATE_FIELD": "unread",
    "UNREAD_WHEN": True,
    "SOFT_DELETE_FIELD": "deleted",
    # Fast retries, so the outage tests take seconds.
    "RETRY_BACKOFF": 0.05,
    "RETRY_BACKOFF_MAX": 0.4,
    "MAX_RETRIES": 8,
    "READ_FAILURE_COOLDOWN": 0,
}

# For subprocesses of the tests: JSON merged into COUNTERSINK.
COUNTERSINK.update(json.loads(os.environ.get("COUNTERSINK_TEST_OVERRIDES", "{}")))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"countersink": {"handlers": ["console"], "level": "WARNING"}},
}
