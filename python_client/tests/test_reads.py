"""Reading counts: real time from the sidecar, in bulk, in templates, from the stored table."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser
from django.template import Context, Template
from helpers import assert_counts_exact, make_user, make_users, notify, settle

import countersink
from countersink import api
from countersink.models import UserNotificationsCount

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]


def test_unread_count_is_real_time_before_any_flush() -> None:
    user = make_user()
    notify(user, 2)
    settle()
    assert countersink.unread_count(user) == 2
    assert countersink.unread_count(user.pk) == 2
    assert not UserNotificationsCount.objects.filter(pk=user.pk).exists()


def test_anonymous_user_has_no_unread_notifications() -> None:
    assert countersink.unread_count(AnonymousUser()) == 0
    assert countersink.unread_count(None) == 0


def test_unread_counts_reads_many_users_in_one_call() -> None:
    users = make_users(3)
    for n, user in enumerate(users):
        notify(user, n)
    settle()
    assert countersink.unread_counts(users) == {users[0].pk: 0, users[1].pk: 1, users[2].pk: 2}
    assert countersink.unread_counts([]) == {}


def test_unread_counts_splits_more_than_a_thousand_users() -> None:
    user = make_user()
    notify(user, 1)
    settle()
    ids = [*list(range(10000000, 10001500)), user.pk]
    counts = countersink.unread_counts(ids)
    assert len(counts) == 1501
    assert counts[user.pk] == 1


def test_stored_count_is_readable_through_the_model_after_a_flush() -> None:
    user = make_user()
    notify(user, 3)
    settle()
    report = api.flush()
    assert report["users_written"] >= 1
    assert UserNotificationsCount.objects.get(pk=user.pk).unread_count == 3
    assert UserNotificationsCount.objects.get(user=user).user == user
    assert_counts_exact()


def test_template_tags_render_the_count_and_the_badge() -> None:
    user, quiet = make_user(), make_user()
    notify(user, 120)
    settle()
    template = Template(
        "{% load countersink_tags %}[{% unread_count user %}]{% unread_badge user %}|{% unread_badge quiet %}|"
        "{% unread_count user as n %}{{ n|add:1 }}"
    )
    html = template.render(Context({"user": user, "quiet": quiet}))
    assert html.startswith("[120]")
    assert 'class="countersink-badge" data-unread-count="120"' in html
    assert ">99+</span>" in html
    assert "|" + "|121" in html  # nothing rendered for a user without unread notifications


def test_a_wrong_read_token_is_refused_and_the_stored_count_answers(caplog: pytest.LogCaptureFixture) -> None:
    from django.test import override_settings

    from countersink import conf

    user = make_user()
    notify(user, 1)
    settle()
    with override_settings(COUNTERSINK={**conf.user_settings(), "READ_TOKEN": "wrong"}):
        assert countersink.unread_count(user) == 0  # the stored table, not flushed yet
    assert "401" in caplog.text


def test_reads_reuse_one_keep_alive_connection_per_thread(live_sidecar) -> None:  # type: ignore[no-untyped-def]
    import threading

    from django.test import override_settings
    from faultproxy import FaultProxy

    from countersink import conf

    users = make_users(3)
    notify(users[0], 2)
    settle()
    proxy = FaultProxy(live_sidecar.port)
    template = Template("{% load countersink_tags %}{% unread_count user %}{% unread_badge user %}")
    try:
        with override_settings(COUNTERSINK={**conf.user_settings(), "SIDECAR_URL": proxy.url}):
            for _ in range(20):
                assert countersink.unread_count(users[0]) == 2
                assert countersink.unread_counts(users)[users[0].pk] == 2
                assert template.render(Context({"user": users[0]})).startswith("2")
            assert proxy.accepted == 1, "every read of this thread went over one connection"
            seen: list[int] = []

            def other_thread() -> None:
                for _ in range(5):
                    seen.append(countersink.unread_count(users[0]))

            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join(10)
            assert seen == [2] * 5
            assert proxy.accepted == 2, "another thread keeps a connection of its own"
    finally:
        proxy.close()
