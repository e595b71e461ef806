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

A save of a notification the sidecar saw deleted (an un-soft-delete, a save that re-inserted a
row deleted under it) needs nothing from here: the sidecar recounts its user by itself.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import re
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
    "replays",
    "events_sent",
    "retries",
    "batches_dropped",
    "events_dropped",
    "queue_full_drops",
    "recounts_sent",
)


_REJECTED_EVENT = re.compile(r"^events\[(\d+)\]")


def rejected_index(error: SidecarRejected, size: int) -> int | None:
    """The index of the event a 400 names (its field is ``events[i]...``), if it names one."""
    match = _REJECTED_EVENT.match(error.field or "") if error.status == 400 else None
    index = int(match.group(1)) if match else None
    return index if index is not None and index < size else None


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
        self._queued_events = 0
        self._busy = False
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()  # set at exit: send without lingering
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
        """Queues one batch (at most 1000 events); never blocks, never raises.

        A batch that does not fit in ``QUEUE_SIZE`` events is dropped whole (and repaired later).
        """
        if app_settings.TEST_MODE:
            return  # a host project's tests: nothing leaves the process
        with self._lock:
            if self._queued_events + len(batch) <= app_settings.QUEUE_SIZE:
                self._queue.append(batch)
                self._queued_events += len(batch)
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
            "countersink: send queue full (QUEUE_SIZE=%d events); dropped %d event(s) for user(s) %s%s. "
            "They are recounted once the sidecar answers again.",
            app_settings.QUEUE_SIZE,
            len(batch),
            describe_users(users),
            f" (and {unlogged} more batch(es) since the last report)" if unlogged else "",
        )

    # -- observing and repairing -------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters since the process started, plus the events waiting now."""
        with self._lock:
            snapshot = dict(self._counters)
            snapshot["queued_events"] = self._queued_events
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
                if not repair:
                    self._linger_locked()
                batches = [] if repair else self._take_locked()
                self._busy = True
            try:
                if repair:
                    self._send_repair(repair)
                else:
                    self._deliver(batches)
            except Exception:
                # A bug here must not stop the thread; the events are accounted for as dropped.
                logger.exception("countersink: unexpected error in the sender thread")
                lost = [event for batch in batches for event in batch]
                if lost:
                    with self._lock:
                        self._record_drop_locked(lost, ev.user_ids(lost), repair=True)

    def _linger_locked(self) -> None:
        """Waits up to ``SEND_LINGER`` for a fuller request: fewer, larger requests cost the
        application's threads less CPU and GIL time than one request per save."""
        deadline = time.monotonic() + app_settings.SEND_LINGER
        while self._queued_events < ev.MAX_EVENTS_PER_REQUEST and not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wakeup.wait(left)

    def _take_locked(self) -> list[list[ev.Event]]:
        """Queued batches to merge into one request of at most 1000 events."""
        batches = [self._queue.popleft()]
        size = len(batches[0])
        while self._queue and size + len(self._queue[0]) <= ev.MAX_EVENTS_PER_REQUEST:
            size += len(self._queue[0])
            batches.append(self._queue.popleft())
        self._queued_events -= size
        return batches

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
                time.sleep(delay)

    @staticmethod
    def _backoff(attempt: int, retry_after: float | None) -> float:
        cap = app_settings.RETRY_BACKOFF_MAX
        delay = random.uniform(0.0, min(cap, app_settings.RETRY_BACKOFF * 2 ** (attempt - 1)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, cap))
        return delay

    def _deliver(self, batches: list[list[ev.Event]]) -> None:
        """Sends queued batches merged into one request.

        When the sidecar rejects one event (its error names ``events[i]``), that event is dropped
        and the rest sent again; when it rejects the request without naming an event, each
        batch is sent on its own, so one bad transaction does not take the others down.
        """
        batch = [event for piece in batches for event in piece]
        while True:
            try:
                result = self._post(batch)
                break
            except SidecarUnavailable as e:
                self._drop(batch, str(e), repair=True)
                return
            except SidecarRejected as e:
                index = rejected_index(e, len(batch))
                if index is not None and len(batch) > 1:
                    self._drop([batch[index]], str(e), repair=False)
                    batch = batch[:index] + batch[index + 1 :]
                    batches = [batch]
                    continue
                if len(batches) > 1:
                    logger.warning("countersink: %s; sending the %d merged batches one by one", e, len(batches))
                    for piece in batches:
                        self._deliver([piece])
                    return
                self._drop(batch, str(e), repair=False)
                return
        with self._lock:
            self._counters["requests"] += 1
            self._counters["events_sent"] += len(batch)
            # An earlier attempt was applied but its answer was lost; the sidecar knew the id.
            self._counters["replays"] += 1 if result.get("replayed") else 0
            # The sidecar answers again: whatever an outage dropped can be repaired now.
            self._repair_due = 0.0
            self._counters["recounts_sent"] += sum(1 for e in batch if e[0] == ev.RECOUNT)

    def _send_repair(self, users: set[int]) -> None:
        invalid = {u for u in users if not 0 <= u <= ev.MAX_ID}
        if invalid:
            logger.error("countersink: user id(s) %s cannot be recounted: not valid ids", describe_users(invalid))
        batch = [ev.recount_event(u) for u in sorted(users - invalid)]
        for piece in ev.chunks(batch):
            while piece:
                piece_users = ev.user_ids(piece)
                try:
                    self._post(piece)
                except SidecarUnavailable as e:
                    logger.warning("countersink: recount of user(s) %s postponed: %s", describe_users(piece_users), e)
                    with self._lock:
                        self._repair_users |= piece_users
                        self._repair_due = time.monotonic() + app_settings.RETRY_BACKOFF_MAX
                    break
                except SidecarRejected as e:
                    index = rejected_index(e, len(piece))
                    refused = {piece[index][2]} if index is not None and len(piece) > 1 else piece_users
                    logger.error(
                        "countersink: the sidecar refused to recount user(s) %s: %s. Their counts may be "
                        "wrong until `manage.py countersink_reconcile --user ID ...` runs.",
                        describe_users(refused),
                        e,
                    )
                    with self._lock:
                        self._dropped_users |= refused
                    piece = [event for event in piece if event[2] not in refused]
                    continue
                with self._lock:
                    self._counters["requests"] += 1
                    self._counters["recounts_sent"] += len(piece)
                    self._dropped_users -= piece_users
                logger.info("countersink: recounted user(s) %s", describe_users(piece_users))
                break

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
        """Gives queued events up to ``SHUTDOWN_TIMEOUT`` to leave; logs what could not."""
        if self._thread is None:
            return
        timeout = app_settings.SHUTDOWN_TIMEOUT
        with self._lock:
            self._stopping.set()
            self._wakeup.notify()
        if self.wait_until_sent(timeout):
            return
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
