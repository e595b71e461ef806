//! Group commit: concurrent event requests merged into one call of the apply script.
//!
//! A call costs Redis a fixed ~30 µs (the call, the script's set-up, its checks) before its
//! first event, which a single-event request, the usual Django case, pays alone. Here at most
//! `calls_in_flight` calls run at once; a request that arrives while they are all busy waits in
//! the queue, and the next call to start takes every request waiting (up to `max_events` events)
//! and applies them together with [`Store::apply_many`]: each keeps its own idempotency record
//! and answer, as if applied alone in order. There is no timer: an idle service starts a call at
//! once, and a request waits for the calls ahead of it (one, unless more than `max_events`
//! events are waiting). Calls run in tasks of their own, so a request whose client went away
//! does not cancel the others merged with it; a request whose handler is gone before its call
//! starts is dropped from the queue unapplied; nothing is answered before its call has returned.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::{Applied, Idempotency, Request, Store, StoreError};
use crate::events::Event;
use crate::metrics;

/// Merges concurrent requests into shared calls of the apply script (see the module).
#[derive(Clone)]
pub struct GroupCommit {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// One permit per call that may run at once.
    calls: Arc<Semaphore>,
    /// Requests waiting for a call, in arrival order.
    queue: Mutex<VecDeque<Queued>>,
    /// Most events in one call (a request larger than this still gets a call of its own).
    max_events: usize,
}

struct Queued {
    events: Vec<Event>,
    idempotency: Option<Idempotency>,
    answer: oneshot::Sender<Result<Applied, StoreError>>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").field("max_events", &self.inner.max_events).finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Applies through `store`, with at most `calls_in_flight` calls at once, each of at most
    /// `max_events` events.
    pub fn new(store: Store, calls_in_flight: usize, max_events: usize) -> Self {
        GroupCommit {
            inner: Arc::new(Inner {
                store,
                calls: Arc::new(Semaphore::new(calls_in_flight.max(1))),
                queue: Mutex::new(VecDeque::new()),
                max_events: max_events.max(1),
            }),
        }
    }

    /// Applies one request's events, alone or merged with others: [`Store::apply_once`]'s answer.
    pub async fn apply(&self, events: Vec<Event>, idempotency: Option<Idempotency>) -> Result<Applied, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.inner.lock_queue().push_back(Queued { events, idempotency, answer });
        Inner::start_calls(&self.inner);
        // The sender is dropped unanswered only if the call's task panicked.
        answered.await.unwrap_or_else(|_| Err(StoreError::Unexpected("the apply call ended without an answer".into())))
    }
}

impl Inner {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        // The queue holds plain data; a panic elsewhere cannot leave it half-changed.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a call for the waiting requests while a call may start and requests wait.
    fn start_calls(inner: &Arc<Inner>) {
        loop {
            let Ok(permit) = inner.calls.clone().try_acquire_owned() else {
                // Every call is busy: the first to finish comes back here.
                return;
            };
            let group = inner.take_group();
            if group.is_empty() {
                drop(permit);
                // A request queued after the take, whose own start found this permit taken,
                // is seen here.
                if inner.lock_queue().is_empty() {
                    return;
                }
                continue;
            }
            let slot = CallSlot { inner: Arc::clone(inner), permit: Some(permit) };
            tokio::spawn(async move { slot.call(group).await });
        }
    }

    /// The waiting requests in arrival order, up to `max_events` events (at least one request).
    fn take_group(&self) -> Vec<Queued> {
        let mut queue = self.lock_queue();
        let mut group: Vec<Queued> = Vec::new();
        let mut events = 0;
        while let Some(next) = queue.front() {
            if next.answer.is_closed() {
                // Its handler is gone (the request deadline answered it, or the client left): as
                // a request that never reached Redis, it applies nothing.
                queue.pop_front();
                continue;
            }
            if !group.is_empty() && events + next.events.len() > self.max_events {
                break;
            }
            events += next.events.len();
            group.extend(queue.pop_front());
        }
        group
    }
}

/// A running call's permit. When the call ends, even by a panic, the permit is given back and the
/// requests that arrived meanwhile get the next call (not only when a later request comes).
struct CallSlot {
    inner: Arc<Inner>,
    permit: Option<OwnedSemaphorePermit>,
}

impl CallSlot {
    async fn call(self, group: Vec<Queued>) {
        let requests: Vec<Request<'_>> =
            group.iter().map(|q| Request { events: &q.events, idempotency: q.idempotency.clone() }).collect();
        metrics::apply_call(requests.len());
        let answers = self.inner.store.apply_many(&requests).await;
        drop(requests);
        match answers {
            Ok(answers) => {
                for (queued, answer) in group.into_iter().zip(answers) {
                    // A request whose client went away is not waiting: its answer is dropped.
                    let _ = queued.answer.send(answer);
                }
            }
            Err(e) => {
                // The call failed whole (nothing applied, or unknown if Redis went away during
                // it): every request gets the error, and a retry finds out through its id.
                for queued in group {
                    let _ = queued.answer.send(Err(e.clone()));
                }
            }
        }
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        Inner::start_calls(&self.inner);
    }
}
