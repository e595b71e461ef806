"""What countersink adds to ``save()`` on the caller's thread.

Run from python_client/ after ``cargo build`` (and ``./run-tests.sh`` once, for the venv):

    .venv/bin/python benchmarks/save_overhead.py [--saves 20000]

It creates a throw-away PostgreSQL test database, starts the real sidecar on it (as the tests
do), and measures, with the sender thread really sending to the sidecar meanwhile:

1. the ``post_save`` receiver alone, called as Django calls it, in autocommit (each event is
   queued at once) and inside transactions of 100 saves (events wait for the commit);
2. whole ``save()`` calls (an UPDATE on PostgreSQL) with the receivers connected and
   disconnected, interleaved in blocks; the difference of the medians is the overhead as a
   caller sees it, but it sits inside the database's own noise.

Medians are the figure to quote; p99 shows the GIL hand-offs to the sender thread.
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
os.environ["COUNTERSINK_TEST_RUN_ID"] = f"bench_{os.getpid()}"

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from _harness import sidecar_on_test_database  # noqa: E402
from django.db import transaction  # noqa: E402
from django.test.utils import override_settings  # noqa: E402
from testproject.notifications.models import Notification  # noqa: E402

import countersink  # noqa: E402
from countersink import receivers  # noqa: E402


def percentiles(samples_ns: list[int]) -> tuple[float, float, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return (
        statistics.median(ordered) / 1000,
        ordered[int(n * 0.9)] / 1000,
        ordered[min(n - 1, int(n * 0.99))] / 1000,
    )


def time_calls(n: int, call: Callable[[int], None]) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for i in range(n):
        started = clock()
        call(i)
        samples.append(clock() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=20_000, help="receiver calls per scenario")
    parser.add_argument("--full-saves", type=int, default=3_000, help="save() calls per side")
    parser.add_argument("--linger", type=float, default=None, help="SEND_LINGER to use (default: the setting's)")
    args = parser.parse_args()
    # Saves are timed in rounds of 500 (receiver calls in transactions of 100): fewer measure nothing.
    if args.full_saves < 500 or args.saves < 100:
        parser.error("give --full-saves of at least 500 and --saves of at least 100")

    with sidecar_on_test_database("csbench") as sidecar:
        config = {**settings.COUNTERSINK, "SIDECAR_URL": sidecar.url}
        if args.linger is not None:
            config["SEND_LINGER"] = args.linger
        with override_settings(COUNTERSINK=config):
            run(args.saves, args.full_saves)


def run(saves: int, full_saves: int) -> None:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create(username="bench")
    note = Notification.objects.create(recipient=user)
    countersink.wait_until_sent(10)

    def receiver_call(i: int) -> None:
        note.unread = bool(i & 1)
        receivers.on_post_save(sender=Notification, instance=note, created=False, using="default")

    # Warm-up: connections open, caches filled.
    time_calls(500, receiver_call)
    countersink.wait_until_sent(30)

    autocommit = time_calls(saves, receiver_call)
    countersink.wait_until_sent(60)

    in_transactions: list[int] = []
    for start in range(0, saves, 100):
        offset = start

        def call_in_block(i: int, offset: int = offset) -> None:
            receiver_call(offset + i)

        with transaction.atomic():
            in_transactions += time_calls(100, call_in_block)
    countersink.wait_until_sent(60)

    def full_save(i: int) -> None:
        note.unread = bool(i & 1)
        note.save()

    connected: list[int] = []
    disconnected: list[int] = []
    for _ in range(full_saves // 500):
        connected += time_calls(500, full_save)
        receivers.disconnect()
        disconnected += time_calls(500, full_save)
        receivers.connect()
    countersink.wait_until_sent(60)
    stats = countersink.stats()

    print(f"Python {sys.version.split()[0]}, Django {django.get_version()}, {os.cpu_count()} CPUs")
    print(f"{'scenario':58} {'median':>8} {'p90':>8} {'p99':>8}  (µs)")
    rows = [
        (f"post_save receiver, autocommit ({saves} calls)", autocommit),
        (f"post_save receiver, in transactions of 100 ({saves} calls)", in_transactions),
        (f"save() with countersink ({len(connected)} UPDATEs)", connected),
        (f"save() without countersink ({len(disconnected)} UPDATEs)", disconnected),
    ]
    for label, samples in rows:
        median, p90, p99 = percentiles(samples)
        print(f"{label:58} {median:8.1f} {p90:8.1f} {p99:8.1f}")
    difference = (statistics.median(connected) - statistics.median(disconnected)) / 1000
    print(f"{'difference of the save() medians':58} {difference:8.1f}")
    print(
        f"sender: {stats['events_sent']} events in {stats['requests']} requests, "
        f"{stats['retries']} retries, {stats['events_dropped']} dropped"
    )


if __name__ == "__main__":
    main()
