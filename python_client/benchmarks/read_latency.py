"""What a badge read costs from Django: ``unread_count()`` against the two ORM reads it replaces.

Run from python_client/ after ``cargo build`` (and ``./run-tests.sh`` once, for the venv):

    .venv/bin/python benchmarks/read_latency.py [--reads 2000] [--unread 5000] [--rows 1000000]

It creates a throw-away PostgreSQL test database, starts the real sidecar on it (as the tests
do; ``COUNTERSINK_BIN`` picks the binary, a release build for numbers worth quoting), and fills
the notification table: one user with ``--unread`` unread notifications (plus as many read ones)
among ``--rows`` rows of other users, spread over the heap: with the default million, nearly each
of the user's rows is on a page of its own, as on a site's large table (with 50,000 rows, 5,000
unread rows shared about 360 pages and the count looked cheaper than it is). The table is then made *busy*: autovacuum is off for it and
a tenth of its rows are updated, so the visibility map is mostly unset and an index-only scan of
``(recipient_id, unread)`` has to visit the heap, as on a table that is being written to.
The user's count is recounted by the sidecar and flushed, so the stored row exists.

Then, interleaved in rounds so that drift in the machine's load hits all three alike, on one
thread (one keep-alive connection to the sidecar, one database connection):

1. ``countersink.unread_count(user)``: the real-time read from the sidecar;
2. ``UserNotificationsCount.objects.get(pk=user_id).unread_count``: the ORM primary-key read of
   the stored table (as of the last flush);
3. ``Notification.objects.filter(recipient=user, unread=True).count()``: the ``COUNT(*)``.

It prints medians, p90 and p99 in microseconds and the ratios the issue sets targets for:
``unread_count`` median / ``.get()`` median (target ≤ 1.0) and ``.count()`` median /
``unread_count`` median (target ≥ 10). Every read is checked to return the right count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
os.environ["COUNTERSINK_TEST_RUN_ID"] = f"readbench_{os.getpid()}"

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from _harness import sidecar_on_test_database  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import override_settings  # noqa: E402
from sidecar import binary_path  # noqa: E402
from testproject.notifications.models import Notification  # noqa: E402

import countersink  # noqa: E402
from countersink import api  # noqa: E402
from countersink.models import UserNotificationsCount  # noqa: E402

#: Rows per bulk_create while filling the table.
FILL_BATCH = 5_000
#: Reads of each kind per round (rounds interleave the three kinds).
ROUND = 100


def percentiles(samples_ns: list[int]) -> tuple[float, float, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return (statistics.median(ordered) / 1000, ordered[int(n * 0.9)] / 1000, ordered[min(n - 1, int(n * 0.99))] / 1000)


def time_calls(n: int, call: Callable[[], int], expected: int) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        started = clock()
        value = call()
        samples.append(clock() - started)
        if value != expected:
            raise AssertionError(f"a read answered {value}, expected {expected}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=2_000, help="reads of each kind")
    parser.add_argument("--unread", type=int, default=5_000, help="unread notifications of the measured user")
    parser.add_argument("--rows", type=int, default=1_000_000, help="notifications of other users")
    args = parser.parse_args()

    with sidecar_on_test_database("csreadbench") as sidecar:
        with override_settings(COUNTERSINK={**settings.COUNTERSINK, "SIDECAR_URL": sidecar.url}):
            run(args.reads, args.unread, args.rows)


def fill(unread: int, rows: int) -> int:
    from django.contrib.auth import get_user_model

    User = get_user_model()
    user = User.objects.create(username="reader")
    others = User.objects.bulk_create([User(username=f"other-{i}") for i in range(100)])
    table = Notification._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    # Plain bulk_create (the untracked manager): the sidecar learns the count by a recount below.
    mine = [Notification(recipient=user, unread=True) for _ in range(unread)]
    mine += [Notification(recipient=user, unread=False) for _ in range(unread)]
    theirs = [Notification(recipient=others[i % len(others)], unread=bool(i % 3)) for i in range(rows)]
    everything = mine + theirs
    everything.sort(key=lambda n: hash((n.recipient_id, id(n))))  # the user's rows spread over the heap
    for start in range(0, len(everything), FILL_BATCH):
        Notification.objects.bulk_create(everything[start : start + FILL_BATCH])
    with connection.cursor() as cursor:
        # Recent writes: a tenth of the rows get a new version, none of the pages is all-visible.
        cursor.execute(f"UPDATE {table} SET text = 'touched' WHERE id % 10 = 0")
        cursor.execute(f"ANALYZE {table}")
    countersink.reconcile_users([user.pk])  # the sidecar recounts and flushes the user
    return int(user.pk)


def run(reads: int, unread: int, rows: int) -> None:
    started = time.monotonic()
    user_id = fill(unread, rows)
    print(f"filled {2 * unread + rows} notifications in {time.monotonic() - started:.1f}s")
    assert api.get_unread_count(user_id)["unread_count"] == unread
    assert UserNotificationsCount.objects.get(pk=user_id).unread_count == unread
    with connection.cursor() as cursor:
        cursor.execute(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) SELECT COUNT(*) FROM {Notification._meta.db_table} "
            "WHERE recipient_id = %s AND unread",
            [user_id],
        )
        plan = [row[0] for row in cursor.fetchall()]
    print("the .count() query plan:")
    for line in plan:
        print("   ", line)

    def sidecar_read() -> int:
        return countersink.unread_count(user_id)

    def orm_get() -> int:
        return int(UserNotificationsCount.objects.get(pk=user_id).unread_count)

    def orm_count() -> int:
        return int(Notification.objects.filter(recipient_id=user_id, unread=True).count())

    kinds: dict[str, tuple[Callable[[], int], list[int]]] = {
        "countersink.unread_count(user)": (sidecar_read, []),
        "UserNotificationsCount.objects.get(pk=...)": (orm_get, []),
        "Notification.objects.filter(...).count()": (orm_count, []),
    }
    for call, _ in kinds.values():  # warm-up: connections open, plans cached
        time_calls(50, call, unread)
    for _ in range(max(1, reads // ROUND)):
        for call, samples in kinds.values():
            samples += time_calls(ROUND, call, unread)

    print(f"Python {sys.version.split()[0]}, Django {django.get_version()}, {os.cpu_count()} CPUs")
    print(f"sidecar: {binary_path()}")
    print(f"{'read (' + str(unread) + ' unread)':46} {'median':>9} {'p90':>9} {'p99':>9}  (µs)")
    medians = {}
    for label, (_, samples) in kinds.items():
        median, p90, p99 = percentiles(samples)
        medians[label] = median
        print(f"{label:46} {median:9.1f} {p90:9.1f} {p99:9.1f}")
    ours, get, count = medians.values()
    print(f"unread_count / .get()   (median ratio, target <= 1.0): {ours / get:.2f}")
    print(f".count() / unread_count (median ratio, target >= 10): {count / ours:.1f}")


if __name__ == "__main__":
    main()
