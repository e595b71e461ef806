"""The sidecar down, hanging, losing answers or refusing: saves stay fast, nothing counts twice,
and what is lost is logged, counted and repaired."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from django.db import transaction
from django.test import override_settings
from faultproxy import FaultProxy, Mode
from helpers import assert_counts_exact, eventually_live, live, make_user, make_users, notify, settle, stored
from sidecar import Sidecar

import countersink
from countersink import conf
from countersink import events as ev
from countersink.sender import sender

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]

#: A save() on the test database takes about a millisecond; a receiver that waited for the
#: network would add the send timeout (seconds) to it.
SLOW_SAVE = 0.25


@pytest.fixture
def proxy(live_sidecar: Sidecar) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the sidecar, set as SIDECAR_URL."""
    faults = FaultProxy(live_sidecar.port)
    config = {**conf.user_settings(), "SIDECAR_URL": faults.url, "SEND_TIMEOUT": 0.3}
    with override_settings(COUNTERSINK=config):
        yield faults
        faults.mode = Mode.PASS
        countersink.wait_until_sent(15)
    faults.close()


def timed_saves(user: object, n: int) -> float:
    """The slowest of ``n`` creates."""
    slowest = 0.0
    for _ in range(n):
        started = time.perf_counter()
        notify(user, 1)
        slowest = max(slowest, time.perf_counter() - started)
    return slowest


def test_sidecar_down_then_back_retries_deliver_everything_once(live_sidecar: Sidecar) -> None:
    user = make_user()
    notify(user, 2)
    settle()
    before = countersink.stats()
    live_sidecar.stop()
    # Enough retries to outlast the outage and the restart on a busy machine: with the test
    # project's 8, full jitter sometimes spent them all in under a second (a CI run dropped the
    # batch, then the next test saw its repair).
    config = {**conf.user_settings(), "MAX_RETRIES": 40}
    with override_settings(COUNTERSINK=config):
        slowest = timed_saves(user, 3)
        with transaction.atomic():
            notify(user, 2)
            read = notify(user, 1)[0]
            read.unread = False
            read.save()
        time.sleep(0.5)  # several attempts fail meanwhile
        live_sidecar.start()
        assert live(user) == 7
    after = countersink.stats()
    assert after["retries"] > before["retries"]
    assert after["events_dropped"] == before["events_dropped"]
    assert slowest < SLOW_SAVE
    assert_counts_exact()


def test_lost_answers_are_retried_and_counted_once(proxy: FaultProxy) -> None:
    user = make_user()
    settle()
    before = countersink.stats()
    proxy.mode = Mode.LOSE_RESPONSES
    with transaction.atomic():
        notes = notify(user, 3)
        notes[0].unread = False
        notes[0].save()
    # Let the sidecar apply the batch a few times without the client hearing back.
    deadline = time.monotonic() + 5
    while proxy.lost_responses < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.lost_responses >= 2
    proxy.mode = Mode.PASS
    assert live(user) == 2
    after = countersink.stats()
    assert after["retries"] - before["retries"] >= 2
    assert after["requests"] - before["requests"] == 1
    # The sidecar recognised the retried webhook-id and did not apply the batch again.
    assert after["replays"] - before["replays"] == 1
    assert_counts_exact()


def test_a_hanging_sidecar_does_not_slow_save(proxy: FaultProxy) -> None:
    user = make_user()
    proxy.mode = Mode.HANG
    slowest = timed_saves(user, 5)
    assert slowest < SLOW_SAVE
    time.sleep(0.5)  # at least one send timed out
    proxy.mode = Mode.PASS
    assert live(user) == 5
    assert countersink.stats()["retries"] > 0
    assert_counts_exact()


def test_full_queue_drops_are_logged_with_users_and_counted(
    proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    users = make_users(6)
    settle()
    before = countersink.stats()
    proxy.mode = Mode.HANG
    tiny_queue = override_settings(COUNTERSINK={**conf.user_settings(), "QUEUE_SIZE": 1})
    with tiny_queue, caplog.at_level(logging.ERROR, logger="countersink"):
        for user in users:
            notify(user, 1)
    after = countersink.stats()
    dropped = after["queue_full_drops"] - before["queue_full_drops"]
    # One batch is in flight, one waits in the queue, the rest are dropped.
    assert dropped >= 4
    assert after["events_dropped"] - before["events_dropped"] == dropped
    lost = sorted(countersink.dropped_user_ids() & {u.pk for u in users})
    assert len(lost) == dropped
    # The first drop is logged with its users; the next ones within a second are only counted.
    assert f"send queue full (QUEUE_SIZE=1 events); dropped 1 event(s) for user(s) {lost[0]}." in caplog.text
    proxy.mode = Mode.PASS


def test_users_dropped_by_a_full_queue_are_recounted_when_the_sidecar_answers(proxy: FaultProxy) -> None:
    users = make_users(5)
    proxy.mode = Mode.HANG
    with override_settings(COUNTERSINK={**conf.user_settings(), "QUEUE_SIZE": 1}):
        for user in users:
            notify(user, 2)
    assert countersink.dropped_user_ids()
    proxy.mode = Mode.PASS
    for user in users:
        eventually_live(user, 2)
    assert not countersink.dropped_user_ids() & {u.pk for u in users}
    assert_counts_exact()


def test_retries_running_out_drops_the_batch_and_logs_its_users(
    live_sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    user = make_user()
    settle()
    before = countersink.stats()
    live_sidecar.stop()
    config = {**conf.user_settings(), "MAX_RETRIES": 2, "RETRY_BACKOFF_MAX": 0.05}
    with override_settings(COUNTERSINK=config), caplog.at_level(logging.ERROR, logger="countersink"):
        notify(user, 1)
        settle()
    after = countersink.stats()
    assert after["events_dropped"] - before["events_dropped"] == 1
    assert after["retries"] - before["retries"] == 2
    assert f"for user(s) {user.pk}" in caplog.text
    assert user.pk in countersink.dropped_user_ids()


def test_a_rejected_batch_is_dropped_at_once_without_retries(caplog: pytest.LogCaptureFixture) -> None:
    settle()
    before = countersink.stats()
    too_big = 2**63  # beyond the sidecar's id range: a 400, which no retry can fix
    with caplog.at_level(logging.ERROR, logger="countersink"):
        sender.submit([ev.save_event(1, too_big, True, True, 0.0)])
        settle()
    after = countersink.stats()
    assert after["retries"] == before["retries"]
    assert after["events_dropped"] - before["events_dropped"] == 1
    assert "HTTP 400" in caplog.text and str(too_big) in caplog.text
    assert too_big in countersink.dropped_user_ids()


def test_reads_fall_back_to_the_stored_table_when_the_sidecar_is_down(
    live_sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    user = make_user()
    notify(user, 2)
    settle()
    countersink.api.flush()
    notify(user, 1)  # pending, not flushed
    settle()
    assert countersink.unread_count(user) == 3
    live_sidecar.stop(crash=True)  # a crash: the pending +1 is not flushed
    with caplog.at_level(logging.WARNING, logger="countersink"):
        assert countersink.unread_count(user) == stored(user.pk) == 2
        assert countersink.unread_counts([user]) == {user.pk: 2}
    assert "served stored unread counts" in caplog.text
    live_sidecar.start()
    assert countersink.unread_count(user) == 3


def test_saves_from_many_threads_while_the_sidecar_restarts_count_exactly(live_sidecar: Sidecar) -> None:
    users = make_users(4)
    from django.db import connection

    def work(index: int) -> None:
        try:
            for i in range(10):
                notify(users[index], 1, unread=bool(i % 3))
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    live_sidecar.stop()
    time.sleep(0.2)
    live_sidecar.start()
    for t in threads:
        t.join(30)
    assert_counts_exact()


def test_repair_dropped_recounts_the_users_an_outage_dropped(live_sidecar: Sidecar) -> None:
    user = make_user()
    settle()
    live_sidecar.stop()
    # No retries, and an automatic repair far in the future: only repair_dropped() can fix it.
    config = {**conf.user_settings(), "MAX_RETRIES": 0, "RETRY_BACKOFF_MAX": 60}
    with override_settings(COUNTERSINK=config):
        notify(user, 1)
        settle()
        assert user.pk in countersink.dropped_user_ids()
        live_sidecar.start()
        assert user.pk in countersink.repair_dropped()
        eventually_live(user, 1)
    assert user.pk not in countersink.dropped_user_ids()
    assert_counts_exact()


def test_events_queued_at_exit_are_sent_before_the_process_ends(live_sidecar: Sidecar) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from django.db import connection

    user = make_user()
    script = (
        "import django; django.setup()\n"
        "from testproject.notifications.models import Notification\n"
        f"Notification.objects.create(recipient_id={user.pk})\n"
        "# exits at once: the event is still queued; the exit handler must send it\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PYTHONPATH": str(Path(__file__).resolve().parent),
        "PGDATABASE": str(connection.settings_dict["NAME"]),
        "COUNTERSINK_TEST_SIDECAR_URL": live_sidecar.url,
        # Without the exit handler the event would wait a minute, and die with the process.
        "COUNTERSINK_TEST_OVERRIDES": json.dumps({"SEND_LINGER": 60}),
    }
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert live(user) == 1
    assert_counts_exact()


def test_one_invalid_event_does_not_take_the_rest_of_its_request_down() -> None:
    user = make_user()
    settle()
    before = countersink.stats()
    far = 8_000_000_000_000_000_000  # a notification id no test database reaches
    # Queued within one SEND_LINGER, the two batches leave in one request.
    sender.submit([ev.save_event(far, user.pk, True, True, 0.0)])
    sender.submit([ev.save_event(far + 1, 2**63, True, True, 0.0)])
    sender.submit([ev.save_event(far + 2, user.pk, True, True, 0.0)])
    assert live(user) == 2
    after = countersink.stats()
    assert after["events_dropped"] - before["events_dropped"] == 1
    assert after["events_sent"] - before["events_sent"] == 2
