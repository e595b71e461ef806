"""The management commands, through call_command, against the real sidecar."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from helpers import make_user, notify, settle, stored

from countersink import conf
from countersink.management.base import EXIT_REJECTED, EXIT_UNREACHABLE

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def unreachable() -> override_settings:
    return override_settings(COUNTERSINK={**conf.user_settings(), "SIDECAR_URL": "http://127.0.0.1:9"})


def test_flush_prints_what_it_wrote() -> None:
    run("countersink_flush")  # whatever earlier tests left pending
    user = make_user()
    notify(user, 2)
    settle()
    output = run("countersink_flush")
    assert "Flushed 1 batch(es)" in output
    assert "delta sum +2" in output
    assert stored(user.pk) == 2
    assert "Nothing to flush" in run("countersink_flush")


def test_flush_can_print_json() -> None:
    report = json.loads(run("countersink_flush", "--json"))
    assert report["batches"] == []


def test_status_shows_pending_users_and_the_last_flush() -> None:
    run("countersink_flush")  # whatever earlier tests left pending
    user = make_user()
    notify(user, 1)
    settle()
    output = run("countersink_status")
    assert "(ok)" in output
    assert "Pending users: 1" in output
    run("countersink_flush")
    output = run("countersink_status")
    assert "Pending users: 0" in output
    assert "Last flush: batch " in output and "delta sum +1" in output


@pytest.mark.parametrize("command", ["countersink_flush", "countersink_status", "countersink_reconcile"])
def test_an_unreachable_sidecar_is_a_clear_command_error(command: str) -> None:
    args = ["--all"] if command == "countersink_reconcile" else []
    with unreachable(), pytest.raises(CommandError) as failure:
        run(command, *args)
    assert "unreachable" in str(failure.value)
    assert "http://127.0.0.1:9" in str(failure.value)
    assert failure.value.returncode == EXIT_UNREACHABLE


def test_reconcile_needs_users_or_all() -> None:
    with pytest.raises(CommandError, match="one of the arguments --user --all is required"):
        run("countersink_reconcile")
    with pytest.raises(CommandError, match="not allowed with argument"):
        run("countersink_reconcile", "--all", "--user", "1")


def test_reconcile_reports_and_repairs_drift_of_chosen_users() -> None:
    from django.db import connection

    user = make_user()
    notify(user, 3)
    settle()
    run("countersink_flush")
    with connection.cursor() as cursor:  # raw SQL: the sidecar does not hear of it
        cursor.execute("UPDATE notifications_notification SET unread = false WHERE recipient_id = %s", [user.pk])
    output = run("countersink_reconcile", "--user", str(user.pk))
    assert f"user {user.pk}: was 3, actually 0 (-3)" in output
    assert stored(user.pk) == 0
    assert "every count was right" in run("countersink_reconcile", "--user", str(user.pk))


def test_reconcile_all_checks_every_user_with_notifications_or_a_stored_count() -> None:
    from django.db import connection

    with_notes, flushed_then_emptied, without = make_user(), make_user(), make_user()
    notify(with_notes, 2)
    notify(flushed_then_emptied, 1)
    settle()
    run("countersink_flush")
    with connection.cursor() as cursor:  # raw SQL the sidecar does not hear of
        cursor.execute("DELETE FROM notifications_notification WHERE recipient_id = %s", [flushed_then_emptied.pk])
    report = json.loads(run("countersink_reconcile", "--all", "--json"))
    # Earlier tests' users (whose rows the test database dropped) still have stored counts, so
    # only this test's users are asserted on.
    drift = {row["user_id"]: (row["stored"], row["actual"]) for row in report["drift"]}
    assert drift.get(flushed_then_emptied.pk) == (1, 0)
    assert with_notes.pk not in drift and without.pk not in drift
    assert report["users_checked"] >= 2
    assert stored(flushed_then_emptied.pk) == 0
    assert "every count was right" in run("countersink_reconcile", "--all")


def test_a_wrong_admin_token_is_refused_with_a_hint() -> None:
    wrong = override_settings(COUNTERSINK={**conf.user_settings(), "ADMIN_TOKEN": "wrong"})
    with wrong, pytest.raises(CommandError) as failure:
        run("countersink_flush")
    assert failure.value.returncode == EXIT_REJECTED
    assert "ADMIN_TOKEN" in str(failure.value)
