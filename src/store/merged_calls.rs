//! Merged calls: concurrent requests served by shared Redis calls. Two kinds use it: event
//! requests ([`GroupCommit`], a group commit of the apply script) and reads of held counts
//! ([`MergedReads`], one pipeline for the users of every waiting read).
//!
//! Each Redis call has a fixed cost (for the apply script ~30 µs of Redis before its first event;
//! for a read the marker checks, the client's message and its wake-ups) that a request alone
//! pays in full. Here at most `calls_in_flight` calls run at once; a request that arrives while
//! they are all busy waits in the queue, and the next call to start takes every request waiting
//! (up to `max_size` events or users) and serves them together: each gets its own answer, as if
//! served alone in order. There is no timer: an idle service starts a call at once, and a request
//! waits for the calls ahead of it (one, unless more than `max_size` is waiting). Calls run in
//! tasks of their own, so a request whose client went away does not cancel the others merged
//! with it; a request whose handler is gone before its call starts is dropped from the queue
//! unserved; nothing is answered before its call has returned.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::{Applied, Idempotency, Request, Store, StoreError};
use crate::events::Event;
use crate::metrics;

/// One kind of call that can serve several requests at once.
trait MergedCall: Send + Sync + 'static {
    /// What one request asks.
    type Input: Send + 'static;
    /// What it is answered.
    type Answer: Send + 'static;

    /// What a request counts against a call's `max_size` (its events, its users).
    fn size(input: &Self::Input) -> usize;

    /// Serves `inputs` in one call: an answer each, in order, or one error for them all.
    fn call(
        &self,
        inputs: &[Self::Input],
    ) -> impl Future<Output = Result<Vec<Result<Self::Answer, StoreError>>, StoreError>> + Send;
}

/// Queues requests and starts the calls that serve them (see the module).
struct Merger<C: MergedCall> {
    inner: Arc<Inner<C>>,
}

impl<C: MergedCall> std::fmt::Debug for Merger<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merger").field("max_size", &self.inner.max_size).finish_non_exhaustive()
    }
}

impl<C: MergedCall> Clone for Merger<C> {
    fn clone(&self) -> Self {
        Merger { inner: Arc::clone(&self.inner) }
    }
}

struct Inner<C: MergedCall> {
    call: C,
    /// One permit per call that may run at once.
    calls: Arc<Semaphore>,
    /// Requests waiting for a call, in arrival order.
    queue: Mutex<VecDeque<Queued<C>>>,
    /// Most events or users in one call (a larger request still gets a call of its own).
    max_size: usize,
}

struct Queued<C: MergedCall> {
    input: C::Input,
    answer: oneshot::Sender<Result<C::Answer, StoreError>>,
}

impl<C: MergedCall> Merger<C> {
    fn new(call: C, calls_in_flight: usize, max_size: usize) -> Self {
        Merger {
            inner: Arc::new(Inner {
                call,
                calls: Arc::new(Semaphore::new(calls_in_flight.max(1))),
                queue: Mutex::new(VecDeque::new()),
                max_size: max_size.max(1),
            }),
        }
    }

    /// Serves one request, alone or merged with others.
    async fn serve(&self, input: C::Input) -> Result<C::Answer, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.inner.lock_queue().push_back(Queued { input, answer });
        Inner::start_calls(&self.inner);
        // The sender is dropped unanswered only if the call's task panicked, answered short or
        // was dropped unrun (the runtime shutting down).
        answered.await.unwrap_or_else(|_| Err(StoreError::Unexpected("the Redis call ended without an answer".into())))
    }
}

impl<C: MergedCall> Inner<C> {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued<C>>> {
        // The queue holds plain data; a panic elsewhere cannot leave it half-changed.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a call for the waiting requests while a call may start and requests wait.
    fn start_calls(inner: &Arc<Self>) {
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

    /// The waiting requests in arrival order, up to `max_size` (at least one request).
    fn take_group(&self) -> Vec<Queued<C>> {
        let mut queue = self.lock_queue();
        let mut group: Vec<Queued<C>> = Vec::new();
        let mut size = 0;
        while let Some(next) = queue.front() {
            if next.answer.is_closed() {
                // Its handler is gone (the request deadline answered it, or the client left): as
                // a request that never reached Redis, it is not served.
                queue.pop_front();
                continue;
            }
            let next_size = C::size(&next.input);
            if !group.is_empty() && size + next_size > self.max_size {
                break;
            }
            size += next_size;
            group.extend(queue.pop_front());
        }
        group
    }
}

/// A running call's permit. When the call ends, even by a panic, the permit is given back and the
/// requests that arrived meanwhile get the next call (not only when a later request comes).
struct CallSlot<C: MergedCall> {
    inner: Arc<Inner<C>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl<C: MergedCall> CallSlot<C> {
    async fn call(self, group: Vec<Queued<C>>) {
        let (inputs, answers): (Vec<C::Input>, Vec<_>) = group.into_iter().map(|q| (q.input, q.answer)).unzip();
        match self.inner.call.call(&inputs).await {
            Ok(results) => {
                // A short reply leaves the last senders unanswered: their requests get an error.
                for (answer, result) in answers.into_iter().zip(results) {
                    // A request whose client went away is not waiting: its answer is dropped.
                    let _ = answer.send(result);
                }
            }
            Err(e) => {
                // The call failed whole (nothing done, or unknown if Redis went away during it):
                // every request gets the error; an event request's retry finds out by its id.
                for answer in answers {
                    let _ = answer.send(Err(e.clone()));
                }
            }
        }
    }
}

impl<C: MergedCall> Drop for CallSlot<C> {
    fn drop(&mut self) {
        drop(self.permit.take());
        Inner::start_calls(&self.inner);
    }
}

/// Applies event requests, merging concurrent ones into shared calls of the apply script: a group
/// commit ([`Store::apply_many`]; each request keeps its own idempotency record and answer).
#[derive(Clone, Debug)]
pub struct GroupCommit(Merger<ApplyCall>);

struct ApplyCall {
    store: Store,
}

/// An event request waiting for its call: what [`Request`] borrows.
struct OwnedRequest {
    events: Vec<Event>,
    idempotency: Option<Idempotency>,
}

impl MergedCall for ApplyCall {
    type Input = OwnedRequest;
    type Answer = Applied;

    fn size(request: &OwnedRequest) -> usize {
        request.events.len()
    }

    async fn call(&self, requests: &[OwnedRequest]) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        let requests: Vec<Request<'_>> =
            requests.iter().map(|r| Request { events: &r.events, idempotency: r.idempotency.clone() }).collect();
        metrics::apply_call(requests.len());
        self.store.apply_many(&requests).await
    }
}

impl GroupCommit {
    /// Applies through `store`, with at most `calls_in_flight` calls at once, each of at most
    /// `max_events` events.
    pub fn new(store: Store, calls_in_flight: usize, max_events: usize) -> Self {
        GroupCommit(Merger::new(ApplyCall { store }, calls_in_flight, max_events))
    }

    /// Applies one request's events, alone or merged with others: [`Store::apply_once`]'s answer.
    pub async fn apply(&self, events: Vec<Event>, idempotency: Option<Idempotency>) -> Result<Applied, StoreError> {
        self.0.serve(OwnedRequest { events, idempotency }).await
    }
}

/// Reads held counts, merging concurrent reads into shared calls of [`Store::held_counts`]: one
/// pipeline with the marker checks once and the users of every merged read.
#[derive(Clone, Debug)]
pub struct MergedReads(Merger<ReadCall>);

struct ReadCall {
    store: Store,
}

impl MergedCall for ReadCall {
    type Input = Vec<u64>;
    type Answer = Vec<Option<i64>>;

    fn size(user_ids: &Vec<u64>) -> usize {
        user_ids.len()
    }

    async fn call(&self, reads: &[Vec<u64>]) -> Result<Vec<Result<Vec<Option<i64>>, StoreError>>, StoreError> {
        metrics::read_call(reads.len());
        let held = if let [only] = reads {
            self.store.held_counts(only).await?
        } else {
            self.store.held_counts(&reads.concat()).await?
        };
        // `held_counts` answers one count per user asked, in order: each read takes its own.
        let mut held = held.into_iter();
        Ok(reads.iter().map(|user_ids| Ok(held.by_ref().take(user_ids.len()).collect())).collect())
    }
}

impl MergedReads {
    /// Reads through `store`, with at most `calls_in_flight` calls at once, each for at most
    /// `max_users` users.
    pub fn new(store: Store, calls_in_flight: usize, max_users: usize) -> Self {
        MergedReads(Merger::new(ReadCall { store }, calls_in_flight, max_users))
    }

    /// [`Store::held_counts`] of `user_ids`, alone or merged with other reads.
    pub async fn held_counts(&self, user_ids: Vec<u64>) -> Result<Vec<Option<i64>>, StoreError> {
        self.0.serve(user_ids).await
    }
}
