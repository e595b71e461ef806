"""Events wait for their transaction to commit, then leave as one batch.

Outside a transaction (autocommit) an event is committed already and is queued at once.
Inside one, events are collected per connection and sent by a single ``on_commit`` callback,
so a transaction's events travel in one request and a rolled-back transaction sends nothing.

Savepoints: a rolled-back savepoint (an inner ``atomic`` block that raised) must take its
events with it, while the rest of the transaction still commits. Django drops the on-commit
callbacks registered inside a rolled-back savepoint, so events are kept in *groups*, one per
run of events under the same savepoints, and each group registers a marker callback through
the public ``transaction.on_commit``. A marker that survives to the commit marks its group
committed. The flush callback must run after every marker and survive every savepoint
rollback: each new group registers a fresh flush (older ones become no-ops) and clears its
savepoint set, the one place this module reads Django's ``run_on_commit`` entries. Should that
layout ever change, events fall back to one ``on_commit`` callback each (still correct, one
request per event), with a warning.
"""

from __future__ import annotations

import logging
import time
import weakref
from functools import partial
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from countersink import events as ev
from countersink.sender import sender

logger = logging.getLogger("countersink")


class _Group:
    """Events recorded under one savepoint stack; committed if its marker runs."""

    __slots__ = ("committed", "events")

    def __init__(self, first: ev.Event) -> None:
        self.events: list[ev.Event] = [first]
        self.committed = False

    def mark_committed(self) -> None:
        self.committed = True


class _Transaction:
    """The events of the transaction open on one connection."""

    __slots__ = ("alias", "connection", "current", "flush_fn", "generation", "groups", "hooks", "sids")

    def __init__(self, alias: str, connection: Any) -> None:
        self.alias = alias
        self.connection = weakref.ref(connection)
        self.groups: list[_Group] = []
        self.current: list[ev.Event] = []
        # The connection's on-commit list and savepoint stack when `current` was opened.
        self.hooks: list[Any] | None = None
        self.sids: list[str | None] = []
        self.generation = 0
        self.flush_fn: partial[None] | None = None

    def flush(self, generation: int) -> None:
        """Queues the committed groups' events (only the newest flush callback does)."""
        if generation != self.generation:
            return
        try:
            connection = self.connection()
            if connection is not None and _transactions.get(connection) is self:
                del _transactions[connection]
            committed = [event for group in self.groups if group.committed for event in group.events]
            for piece in ev.chunks(committed):
                sender.submit(piece)
        except Exception:
            # An on-commit callback that raises would break the caller's other callbacks.
            logger.exception("countersink: could not queue the events of a committed transaction")


#: The open transaction's events, per connection object (connections are per thread/context).
_transactions: weakref.WeakKeyDictionary[Any, _Transaction] = weakref.WeakKeyDictionary()
#: Whether Django's on-commit entries look as expected: (savepoint ids, callback, robust).
_layout_ok = True


def add(event: ev.Event, using: str | None = None) -> None:
    """Records ``event`` for the transaction open on ``using``, or queues it if there is none."""
    alias = using or DEFAULT_DB_ALIAS
    connection = connections[alias]
    if not connection.in_atomic_block:
        if not connection.get_autocommit():
            _manual_transaction_warning(alias)
        sender.submit([event])
        return
    tx = _transactions.get(connection)
    if tx is not None and tx.hooks is connection.run_on_commit and tx.sids == connection.savepoint_ids:
        # The fast path: same transaction, no savepoint entered, left or rolled back since.
        tx.current.append(event)
        return
    _open_group(connection, alias, tx, event)


def add_many(batch: list[ev.Event], using: str | None = None) -> None:
    """Records several events (see :func:`add`); outside a transaction they leave together."""
    if not batch:
        return
    alias = using or DEFAULT_DB_ALIAS
    if not connections[alias].in_atomic_block:
        for piece in ev.chunks(batch):
            sender.submit(piece)
        return
    for event in batch:
        add(event, alias)


def _open_group(connection: Any, alias: str, tx: _Transaction | None, event: ev.Event) -> None:
    global _layout_ok
    if not _layout_ok:
        transaction.on_commit(partial(sender.submit, [event]), using=alias)
        return
    if tx is None or not _is_open(tx, connection.run_on_commit):
        tx = _Transaction(alias, connection)
        _transactions[connection] = tx
    group = _Group(event)
    tx.groups.append(group)
    # Dropped by Django if a savepoint active now rolls back.
    transaction.on_commit(group.mark_committed, using=alias)
    tx.generation += 1
    flush_fn = partial(tx.flush, tx.generation)
    transaction.on_commit(flush_fn, using=alias)
    entry = connection.run_on_commit[-1]
    if isinstance(entry, tuple) and len(entry) >= 2 and entry[1] is flush_fn and isinstance(entry[0], set):
        # Registered as if outside every savepoint: the flush survives any savepoint rollback.
        entry[0].clear()
    else:
        _layout_ok = False
        logger.warning(
            "countersink: unrecognised on_commit internals in this Django version; "
            "sending one request per event instead of one per transaction"
        )
        tx.generation += 1  # disable this flush; the group sends itself
        transaction.on_commit(partial(sender.submit, group.events), using=alias)
    tx.flush_fn = flush_fn
    tx.hooks = connection.run_on_commit
    tx.sids = list(connection.savepoint_ids)
    tx.current = group.events


def _is_open(tx: _Transaction, hooks: list[Any]) -> bool:
    """Whether ``tx`` belongs to the transaction whose on-commit list is ``hooks``.

    A commit or rollback replaces the list; a savepoint rollback copies it without the
    dropped callbacks, but the newest flush (registered outside all savepoints) stays.
    """
    if tx.hooks is hooks:
        return True
    flush_fn = tx.flush_fn
    return flush_fn is not None and any(entry[1] is flush_fn for entry in reversed(hooks))


_warned_manual: set[str] = set()


def _manual_transaction_warning(alias: str) -> None:
    if alias not in _warned_manual:
        _warned_manual.add(alias)
        logger.warning(
            "countersink: database %r is in manual transaction management (autocommit off); "
            "events are sent at once, before the commit, and are not withdrawn on rollback",
            alias,
        )


def now() -> float:
    """The event timestamp: unix time, formatted later by the sender thread."""
    return time.time()
