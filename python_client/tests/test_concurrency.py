"""Several threads racing to mark the same notifications read count each change once."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest
from django.db import connection, transaction
from helpers import assert_counts_exact, live, make_user, notify
from testproject.notifications.models import Notification

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]

THREADS = 8


def run_in_threads(work: Callable[[int], None], n: int = THREADS) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def target(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as e:  # noqa: BLE001 (reported to the test below)
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_threads_marking_the_same_notifications_read_decrement_once() -> None:
    user = make_user()
    notes = notify(user, 10)
    ids = [n.pk for n in notes]

    def mark_all(index: int) -> None:
        order = ids[:]
        random.Random(index).shuffle(order)
        for pk in order:
            # Each thread loads its own copy: every one of them sees "unread".
            note = Notification.objects.get(pk=pk)
            note.unread = False
            note.save()

    run_in_threads(mark_all)
    assert live(user) == 0
    assert_counts_exact()


def test_threads_creating_and_reading_for_one_user_in_transactions() -> None:
    user = make_user()

    def work(index: int) -> None:
        for i in range(5):
            with transaction.atomic():
                note = Notification.objects.create(recipient_id=user.pk, text=f"t{index}-{i}")
                if i % 2:
                    note.unread = False
                    note.save()

    run_in_threads(work)
    assert live(user) == THREADS * 3
    assert_counts_exact()
