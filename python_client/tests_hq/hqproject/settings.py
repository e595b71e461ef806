"""A site on django-notifications-hq 1.8.3, wired as python_client/README.md says, with no
change to the app: its real models, views and admin, soft deletes on, ``TRACK_BULK_WRITES``.

pytest-django creates ``test_cshq_<run id>`` (``_gw0``... per xdist worker); the sidecar
fixture (``tests/sidecar_fixtures.py``) points the real sidecar at it.
"""

from __future__ import annotations

import json
import os
import uuid

from testproject.settings import TEST_ADMIN_TOKEN, TEST_READ_TOKEN, TEST_WEBHOOK_SECRET

__all__ = ["TEST_ADMIN_TOKEN", "TEST_READ_TOKEN", "TEST_WEBHOOK_SECRET"]

RUN_ID = os.environ.setdefault("COUNTERSINK_TEST_RUN_ID", uuid.uuid4().hex[:10])

SECRET_KEY = "countersink-hq-tests-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "hqproject.urls"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "countersink",
    "notifications",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PGDATABASE", "test"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "TEST": {"NAME": f"test_cshq_{RUN_ID}"},
    }
}

# django-notifications-hq: `deleted` is a soft delete (its views and mark_all_as_deleted()).
DJANGO_NOTIFICATIONS_CONFIG = {"SOFT_DELETE": True}

COUNTERSINK = {
    "SIDECAR_URL": "http://127.0.0.1:9",  # replaced by the sidecar fixture
    "WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
    "ADMIN_TOKEN": TEST_ADMIN_TOKEN,
    "READ_TOKEN": TEST_READ_TOKEN,
    "MODEL": "notifications.Notification",
    "RECIPIENT_FIELD": "recipient",
    "READ_STATE_FIELD": "unread",
    "UNREAD_WHEN": True,
    "SOFT_DELETE_FIELD": "deleted",
    # The one line that covers the app's own bulk methods, views and admin actions.
    "TRACK_BULK_WRITES": True,
    "RETRY_BACKOFF": 0.05,
    "RETRY_BACKOFF_MAX": 0.4,
    "READ_FAILURE_COOLDOWN": 0,
}
#: Extra sidecar flags for this suite. The workload test SIGKILLs the sidecar, possibly while it
#: holds the flush lock; its lease (default 300 s) would hold up the restarted process's flushes
#: and recounts that long, so the lease is the shortest the sidecar accepts here.
TEST_SIDECAR_FLAGS = {"--flush-lock-ttl-secs": "10"}

# JSON merged into COUNTERSINK, e.g. '{"TRACK_BULK_WRITES": false}' to see the tests fail.
COUNTERSINK.update(json.loads(os.environ.get("COUNTERSINK_TEST_OVERRIDES", "{}")))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"countersink": {"handlers": ["console"], "level": "WARNING"}},
}
