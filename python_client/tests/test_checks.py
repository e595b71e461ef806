"""System checks catch misconfiguration with stable ids and say how to fix it."""

from __future__ import annotations

from typing import Any

import pytest
from django.core import checks
from django.test import override_settings

from countersink import conf
from countersink.checks import check_settings


def ids_for(**changes: Any) -> list[str]:
    values = {**conf.user_settings(), **changes}
    values = {k: v for k, v in values.items() if v is not _REMOVE}
    with override_settings(COUNTERSINK=values):
        return [m.id for m in check_settings() if m.id]


_REMOVE = object()


def test_the_test_project_is_configured_correctly() -> None:
    assert check_settings() == []
    assert [m for m in checks.run_checks() if m.id and m.id.startswith("countersink")] == []


def test_countersink_must_be_a_dict() -> None:
    with override_settings(COUNTERSINK=None):
        (error,) = check_settings()
    assert error.id == "countersink.E001"
    assert error.hint and "COUNTERSINK = {" in error.hint


def test_unknown_keys_are_caught_with_a_suggestion() -> None:
    with override_settings(COUNTERSINK={**conf.user_settings(), "SIDCAR_URL": "http://x"}):
        (error,) = check_settings()
    assert error.id == "countersink.E002"
    assert error.hint == "Did you mean 'SIDECAR_URL'?"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"SIDECAR_URL": "127.0.0.1:7878"}, "countersink.E003"),
        ({"WEBHOOK_SECRET": _REMOVE}, "countersink.E004"),
        ({"WEBHOOK_SECRET": "not-a-secret"}, "countersink.E004"),
        ({"WEBHOOK_SECRET": "whsec_%%%"}, "countersink.E004"),
        ({"WEBHOOK_SECRET": "whsec_c2hvcnQ="}, "countersink.E004"),
        ({"MODEL": _REMOVE}, "countersink.E005"),
        ({"MODEL": "notifications"}, "countersink.E005"),
        ({"MODEL": "notifications.Missing"}, "countersink.E005"),
        ({"RECIPIENT_FIELD": "text"}, "countersink.E007"),
        ({"RECIPIENT_FIELD": "nope"}, "countersink.E007"),
        ({"READ_STATE_FIELD": "text"}, "countersink.E008"),
        ({"UNREAD_WHEN": "yes"}, "countersink.E009"),
        ({"SOFT_DELETE_FIELD": "text"}, "countersink.E010"),
        ({"QUEUE_SIZE": 0}, "countersink.E011"),
        ({"SEND_TIMEOUT": "2"}, "countersink.E011"),
        ({"MAX_RETRIES": True}, "countersink.E011"),
        ({"READ_TOKEN": 42}, "countersink.E012"),
        ({"ADMIN_TOKEN": _REMOVE}, "countersink.W001"),
    ],
)
def test_each_misconfiguration_has_its_id(changes: dict[str, Any], expected: str) -> None:
    assert ids_for(**changes) == [expected]


def test_a_model_keyed_by_uuid_is_refused() -> None:
    assert ids_for(MODEL="notifications.UuidNotification", SOFT_DELETE_FIELD=None) == ["countersink.E006"]


def test_a_recipient_that_is_not_the_user_model_is_a_warning() -> None:
    assert ids_for(MODEL="notifications.UuidNotification", RECIPIENT_FIELD="group", SOFT_DELETE_FIELD=None) == [
        "countersink.E006",
        "countersink.W002",
    ]


def test_messages_name_the_fields_that_exist() -> None:
    with override_settings(COUNTERSINK={**conf.user_settings(), "READ_STATE_FIELD": "read"}):
        (error,) = check_settings()
    assert error.id == "countersink.E008"
    assert error.hint and "unread" in error.hint and "deleted" in error.hint


def test_the_model_mapping_follows_override_settings() -> None:
    assert conf.mapping().read_state_attname == "unread"
    with override_settings(
        COUNTERSINK={
            **conf.user_settings(),
            "MODEL": "notifications.Alert",
            "RECIPIENT_FIELD": "user",
            "READ_STATE_FIELD": "is_read",
            "UNREAD_WHEN": False,
            "SOFT_DELETE_FIELD": None,
        }
    ):
        mapping = conf.mapping()
        assert (mapping.recipient_attname, mapping.read_state_attname, mapping.unread_when) == (
            "user_id",
            "is_read",
            False,
        )
        assert check_settings() == []
    assert conf.mapping().read_state_attname == "unread"


def test_track_bulk_writes_and_test_mode_must_be_bools() -> None:
    assert ids_for(TRACK_BULK_WRITES="yes") == ["countersink.E014"]
    assert ids_for(TEST_MODE=1) == ["countersink.E014"]
    assert ids_for(TRACK_BULK_WRITES=True, TEST_MODE=False) == []


def test_test_mode_needs_no_secret_but_is_flagged_by_check_deploy() -> None:
    from countersink.checks import check_deploy

    assert ids_for(TEST_MODE=True, WEBHOOK_SECRET=_REMOVE) == []
    assert ids_for(WEBHOOK_SECRET=_REMOVE) == ["countersink.E004"]
    with override_settings(COUNTERSINK={**conf.user_settings(), "TEST_MODE": True}):
        assert [m.id for m in check_deploy()] == ["countersink.W003"]
    assert check_deploy() == []
