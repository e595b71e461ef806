"""The background sender: a bounded queue, one thread, retries, and an account of every loss.

The caller's thread only appends a batch to the queue (:meth:`Sender.submit`); it never waits
for the network. One daemon thread sends the batches in order over a keep-alive connection,
merging queued batches into requests of at most 1000 events. Order matters: an older batch
retried after a newer one was applied could undo it, so a failing batch is retried in place,
with exponential backoff and full jitter, before anything queued behind it.

What is lost is logged with the affected user ids and counted (:meth:`Sender.stats`):

- a full queue drops the new batch (on the caller's thread, with rate-limited logging);
- a batch still failing after ``MAX_RETRIES`` retries is dropped;
- a 4xx answer (other than 408/429) drops the batch at once: resending it cannot help.

Users of batches lost to an outage or a full queue are repaired by themselves: once a request
succeeds again, a ``recount`` event is sent for each of them. Users lost to a 4xx stay listed in
:meth:`Sender.dropped_user_ids` for ``manage.py countersink_reconcile``.

A save of a notification the sidecar saw deleted (an un-soft-delete) is answered with an
``after_delete`` outcome; its users are recounted too.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
from collections import deque
from typing import Any

from countersink import events as ev
from countersink import signing
from countersink.conf import app_settings
from countersink.errors import SidecarRejected, SidecarUnavailable
from countersink.transport import Transport, raise_for_status, transport

logger = logging.getLogger("countersink")

#: Most users remembered for repair; beyond that only a full reconcile helps.
MAX_TRACKED_DROPPED_USERS = 100_000
#: At most one "queue full" log line per this many seconds (the rest are counted).
QUEUE_FULL_LOG_INTERVAL = 1.0
#: How many user ids a log line lists before it says "and N more".
LOGGED_USER_IDS = 50

_COUNTERS = (
    "batches_queued",
    "events_queued",
    "requests",
    "events_sent",
    "retries",
    "batches_dropped",
    "events_dropped",
    "queue_full_drops",
    "recounts_sent",
    "after_delete_recounts",
)


def describe_users(user_ids: set[int] | frozenset[int]) -> str:
    """``1, 2, 3`` or ``1, 2, ... and 40 more``, sorted."""
    ordered = sorted(user_ids)
    shown = ", ".join(str(u) for u in ordered[:LOGGED_USER_IDS])
    extra = len(ordered) - LOGGED_USER_IDS
    return f"{shown} and {extra} more" if extra > 0 else shown


class Sender:
    """Sends event batches from a background thread. One per process (:data:`sender`)."""

    def __init__(self, http: Transport) -> None:
        self._http = http
        self._init_state()
        os.register_at_fork(after_in_child=self._init_state)
        atexit.register(self._at_exit)

    def _init_state(self) -> None:
        # Also run in a forked child: the parent's thread, locks and queued batches are not ours.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._queue: deque[list[ev.Event]] = deque()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._dropped_users: set[int] = set()
        self._dropped_overflow = False
        self._repair_users: set[int] = set()
        self._repair_due = 0.0
        self._last_queue_full_log = 0.0
        self._queue_full_unlogged = 0
        self._key_cache: tuple[str | None, bytes | None] = (None, None)

    # -- the caller's side -------------------------------------------------------------------

    def submit(self, batch: list[ev.Event]) -> None:
        """Queues one batch (at most 1000 events); never blocks, never raises."""
        with self._lock:
            if len(self._queue) < app_settings.QUEUE_SIZE:
                self._queue.append(batch)
                self._counters["batches_queued"] += 1
                self._counters["events_queued"] += len(batch)
                self._wakeup.notify()
                batch = []
        if batch:
            self._queue_full(batch)
        elif self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="countersink-sender", daemon=True)
        self._thread.start()

    def _queue_full(self, batch: list[ev.Event]) -> None:
        users = ev.user_ids(batch)
        now = time.monotonic()
        with self._lock:
            self._counters["queue_full_drops"] += 1
            self._record_drop_locked(batch, users, repair=True)
            if now - self._last_queue_full_log < QUEUE_FULL_LOG_INTERVAL:
                self._queue_full_unlogged += 1
                return
            unlogged, self._queue_full_unlogged = self._queue_full_unlogged, 0
            self._last_queue_full_log = now
        logger.error(
            "countersink: send queue full (QUEUE_SIZE=%d); dropped %d event(s) for user(s) %s%s. "
            "They are recounted once the sidecar answers again.",
            app_settings.QUEUE_SIZE,
            len(batch),
            describe_users(users),
            f" (and {unlogged} more batch(es) since the last report)" if unlogged else "",
        )

    # -- observing and repairing -------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters since the process started, plus the current queue length."""
        with self._lock:
            snapshot = dict(self._counters)
            snapshot["queue_length"] = len(self._queue)
            snapshot["users_awaiting_repair"] = len(self._dropped_users)
            return snapshot

    def dropped_user_ids(self) -> frozenset[int]:
        """Users whose events were dropped and not yet repaired by a recount."""
        with self._lock:
            return frozenset(self._dropped_users)

    def repair_dropped(self) -> frozenset[int]:
        """Asks for a recount of every user still awaiting repair; returns them."""
        with self._lock:
            users = frozenset(self._dropped_users)
            self._repair_users |= users
            self._repair_due = 0.0
            self._wakeup.notify()
        if users and self._thread is None:
            self._start()
        return users

    def wait_until_sent(self, timeout: float | None = None) -> bool:
        """Waits until the queue is empty and nothing is in flight; ``False`` on timeout."""
        with self._lock:
            return self._idle.wait_for(self._is_idle_locked, timeout)

    def _is_idle_locked(self) -> bool:
        repair_due = bool(self._repair_users) and time.monotonic() >= self._repair_due
        return not self._queue and not self._busy and not repair_due

    # -- the sender thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            repair: set[int] = set()
            with self._lock:
                while True:
                    now = time.monotonic()
                    if self._repair_users and now >= self._repair_due:
                        repair, self._repair_users = self._repair_users, set()
                        break
                    if self._queue:
                        break
                    self._busy = False
                    self._idle.notify_all()
                    wait = self._repair_due - now if self._repair_users else None
                    self._wakeup.wait(wait)
                batch = [] if repair else self._take_locked()
                self._busy = True
            try:
                if repair:
                    self._send_repair(repair)
                else:
                    self._deliver(batch)
            except Exception:
                # A bug here must not stop the thread; the batch is accounted for as dropped.
                logger.exception("countersink: unexpected error in the sender thread")
                if batch:
                    with self._lock:
                        self._record_drop_locked(batch, ev.user_ids(batch), repair=True)

    def _take_locked(self) -> list[ev.Event]:
        """Queued batches merged into one request; a batch is never split."""
        batch = list(self._queue.popleft())
        while self._queue and len(batch) + len(self._queue[0]) <= ev.MAX_EVENTS_PER_REQUEST:
            batch.extend(self._queue.popleft())
        return batch

    def _signing_key(self) -> bytes | None:
        secret = app_settings.WEBHOOK_SECRET
        cached_secret, cached_key = self._key_cache
        if secret != cached_secret:
            cached_key = signing.decode_secret(secret) if secret else None
            self._key_cache = (secret, cached_key)
        return cached_key

    def _post(self, batch: list[ev.Event]) -> dict[str, Any]:
        """Sends ``batch`` until it is answered, retrying what may succeed later.

        Raises :class:`SidecarUnavailable` once retries are exhausted and
        :class:`SidecarRejected` at once.
        """
        body = ev.encode(batch)
        message_id = signing.new_message_id()
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    "POST",
                    app_settings.SIDECAR_URL,
                    "/v1/events",
                    body=body,
                    headers=signing.headers(self._signing_key(), message_id, body),
                    connect_timeout=app_settings.CONNECT_TIMEOUT,
                    timeout=app_settings.SEND_TIMEOUT,
                )
                result = raise_for_status(response, "POST /v1/events")
                return result if isinstance(result, dict) else {}
            except SidecarUnavailable as e:
                attempt += 1
                if attempt > app_settings.MAX_RETRIES:
                    raise SidecarUnavailable(f"{e}; gave up after {attempt} attempts") from e
                delay = self._backoff(attempt, e.retry_after)
                log = logger.warning if attempt == 1 else logger.debug
                log("countersink: %s; retry %d in %.2fs", e, attempt, delay)
                with self._lock:
                    self._counters["retries"] += 1
                self._stopping.wait(delay)

    @staticmethod
    def _backoff(attempt: int, retry_after: float | None) -> float:
        cap = app_settings.RETRY_BACKOFF_MAX
        delay = random.uniform(0.0, min(cap, app_settings.RETRY_BACKOFF * 2 ** (attempt - 1)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, cap))
        return delay

    def _deliver(self, batch: list[ev.Event]) -> None:
        try:
            result = self._post(batch)
        except SidecarUnavailable as e:
            self._drop(batch, str(e), repair=True)
            return
        except SidecarRejected as e:
            self._drop(batch, str(e), repair=False)
            return
        with self._lock:
            self._counters["requests"] += 1
            self._counters["events_sent"] += len(batch)
            # The sidecar answers again: whatever an outage dropped can be repaired now.
            self._repair_due = 0.0
        outcomes = result.get("outcomes")
        after_delete = outcomes.get("after_delete", 0) if isinstance(outcomes, dict) else 0
        if after_delete:
            users = {e[2] for e in batch if e[0] == ev.POST_SAVE}
            logger.info(
                "countersink: %d save(s) arrived for notifications the sidecar has as deleted "
                "(un-soft-deleted?); recounting user(s) %s",
                after_delete,
                describe_users(users),
            )
            with self._lock:
                self._counters["after_delete_recounts"] += len(users)
                self._repair_users |= users

    def _send_repair(self, users: set[int]) -> None:
        batch = [ev.recount_event(u) for u in sorted(users)]
        for piece in ev.chunks(batch):
            piece_users = ev.user_ids(piece)
            try:
                self._post(piece)
            except SidecarUnavailable as e:
                logger.warning("countersink: recount of user(s) %s postponed: %s", describe_users(piece_users), e)
                with self._lock:
                    self._repair_users |= piece_users
                    self._repair_due = time.monotonic() + app_settings.RETRY_BACKOFF_MAX
                continue
            except SidecarRejected as e:
                logger.error(
                    "countersink: the sidecar refused to recount user(s) %s: %s. Their counts may be "
                    "wrong until `manage.py countersink_reconcile --user ID ...` runs.",
                    describe_users(piece_users),
                    e,
                )
                with self._lock:
                    self._dropped_users |= piece_users
                continue
            with self._lock:
                self._counters["requests"] += 1
                self._counters["recounts_sent"] += len(piece)
                self._dropped_users -= piece_users
            logger.info("countersink: recounted user(s) %s", describe_users(piece_users))

    def _drop(self, batch: list[ev.Event], reason: str, *, repair: bool) -> None:
        users = ev.user_ids(batch)
        with self._lock:
            self._record_drop_locked(batch, users, repair=repair)
        how = (
            "they are recounted once the sidecar answers again"
            if repair
            else "run `manage.py countersink_reconcile --user ID ...` for them"
        )
        logger.error(
            "countersink: dropped %d event(s) for user(s) %s: %s; %s",
            len(batch),
            describe_users(users),
            reason,
            how,
        )

    def _record_drop_locked(self, batch: list[ev.Event], users: set[int], *, repair: bool) -> None:
        self._counters["batches_dropped"] += 1
        self._counters["events_dropped"] += len(batch)
        if len(self._dropped_users) + len(users) > MAX_TRACKED_DROPPED_USERS:
            if not self._dropped_overflow:
                logger.error(
                    "countersink: more than %d users await repair; run "
                    "`manage.py countersink_reconcile --all` once the sidecar is back",
                    MAX_TRACKED_DROPPED_USERS,
                )
            self._dropped_overflow = True
            return
        self._dropped_users |= users
        if repair:
            # The sidecar is failing now; try the recount after a backoff, or after the next success.
            self._repair_users |= users
            self._repair_due = time.monotonic() + app_settings.RETRY_BACKOFF_MAX

    def _at_exit(self) -> None:
        if self._thread is None:
            return
        timeout = app_settings.SHUTDOWN_TIMEOUT
        if self.wait_until_sent(timeout):
            return
        self._stopping.set()  # skip the remaining backoff sleeps
        with self._lock:
            left = [event for batch in self._queue for event in batch]
        if left:
            logger.error(
                "countersink: exiting with %d unsent event(s) for user(s) %s (SHUTDOWN_TIMEOUT=%ss); "
                "run `manage.py countersink_reconcile --user ID ...` for them",
                len(left),
                describe_users(ev.user_ids(left)),
                timeout,
            )


#: The process-wide sender.
sender = Sender(transport)
