//! The accept loop in front of the router: hyper's HTTP/1 with a header-read timeout, a cap on
//! open connections and a graceful stop.
//!
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout is off: a client that opens
//! a connection and sends half a request line, or an idle keep-alive connection, stays open for
//! ever and holds a file descriptor. Here every connection gets `--header-timeout-secs` to send
//! each request's head, counted from when it opens or from its previous response, and at most
//! `--max-connections` are open at once (further clients wait in the kernel's listen queue). Only
//! HTTP/1.1 is spoken: hyper-util's version sniffing reads the first bytes with no timeout.
//!
//! Connections are served on [`HttpThreads`]: `--http-threads` threads, each a single-threaded
//! runtime with a Redis connection of its own, and the accept loop hands each new connection to
//! the thread with the fewest open. A connection is served start to end on its thread: a
//! request's task, the Redis call its events or read share with the thread's other requests and
//! the task driving that Redis connection wake one another without waking another thread, as on
//! tokio's work-stealing runtime they could at each step (docs/design.md, *HTTP threads*, has
//! what that changed: batched ingest, not the single read).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::metrics;

/// How long to wait after an accept failed for a reason other than the client (the open-file
/// limit, most often) before trying again: short enough to serve as soon as descriptors free up,
/// long enough not to spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// The connection-level limits, from [`crate::config::ServeConfig`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a connection may take to send a request's line and headers.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// The threads that serve connections, each a single-threaded runtime with the router over a
/// state of its own ([`crate::app::AppState::for_http_thread`]). Clones share the threads, which
/// run until the last clone is dropped: `serve` holds one, and whoever started them holds another
/// until its own work on Redis is done (a connection of the shared store that a request opened
/// first is driven by a task on that request's thread).
#[derive(Clone)]
pub struct HttpThreads {
    threads: Arc<[HttpThread]>,
    /// Where the next pick starts, so that threads with as many connections take turns.
    next: Arc<AtomicUsize>,
    /// Dropped with the last clone: each thread's runtime then returns and drops what it still runs.
    _exit: Arc<watch::Sender<()>>,
}

struct HttpThread {
    runtime: Handle,
    router: Router,
    /// Connections open on this thread.
    open: Arc<AtomicUsize>,
}

impl HttpThreads {
    /// Starts `count` threads (at least 1), each serving with a router `router_for` makes. It is
    /// called inside the thread's runtime, so what it sets up for later (a lazy connection's tasks)
    /// belongs to that thread.
    pub fn start(count: usize, router_for: impl Fn() -> anyhow::Result<Router>) -> anyhow::Result<Self> {
        anyhow::ensure!(count > 0, "at least one HTTP thread is needed");
        let (exit, exited) = watch::channel(());
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let name = format!("countersink-http-{index}");
            // Its blocking pool (SQL of the reads' loads) carries the thread's name too.
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().thread_name(&name).build()?;
            let handle = runtime.handle().clone();
            let mut exited = exited.clone();
            std::thread::Builder::new().name(name).spawn(move || {
                runtime.block_on(async move {
                    let _ = exited.changed().await;
                });
            })?;
            let router = {
                let _inside = handle.enter();
                router_for()?
            };
            threads.push(HttpThread { runtime: handle, router, open: Arc::new(AtomicUsize::new(0)) });
        }
        Ok(HttpThreads { threads: threads.into(), next: Arc::new(AtomicUsize::new(0)), _exit: Arc::new(exit) })
    }

    /// The connections open on each thread, in thread order.
    pub fn connections(&self) -> Vec<usize> {
        self.threads.iter().map(|thread| thread.open.load(Ordering::Relaxed)).collect()
    }

    /// The thread with the fewest open connections (ties in turn): a keep-alive connection stays on
    /// its thread for its life, so where new ones go is the only balancing there is.
    fn pick(&self) -> &HttpThread {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.threads.len();
        let at = (0..count)
            .map(|i| (first + i) % count)
            .min_by_key(|&i| self.threads[i].open.load(Ordering::Relaxed))
            .unwrap_or(0);
        &self.threads[at]
    }
}

/// A connection counted open on its thread and in the metrics until it is dropped, however its
/// task ends (a panic, or unrun at exit).
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        metrics::connection_opened();
        OpenConnection(Arc::clone(open))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::connection_closed();
    }
}

/// Serves `listener`'s connections on `threads` until `shutdown` resolves; then stops accepting, lets every
/// open connection finish its request in flight (idle ones close at once), and returns.
pub async fn serve(
    listener: TcpListener,
    threads: HttpThreads,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopping) = watch::channel(false);
    // Each connection task holds a receiver; `closed()` resolves when the last one ends.
    let (open_tx, open_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed; nothing to serve with if it were
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed (at the open-file limit? raise LimitNOFILE or lower --max-connections); retrying");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small responses go out at once rather than waiting for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        // Moved to the thread's runtime: taken off this one's poller, put on that one's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                debug!(error = %e, %peer, "could not hand a connection to an HTTP thread");
                continue;
            }
        };
        let thread = threads.pick();
        let router = thread.router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
        let mut stopping = stopping.clone();
        let open = open_rx.clone();
        let counted = OpenConnection::new(&thread.open);
        thread.runtime.spawn(async move {
            let _slot = slot;
            let _open = open;
            let _counted = counted;
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(error = %e, %peer, "an HTTP thread could not take a connection");
                    return;
                }
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            // A client that went away, or one cut off by the header timeout.
            if let Err(e) = &result {
                debug!(error = %e, %peer, "connection ended with an error");
            }
            if result.as_ref().is_err_and(hyper::Error::is_timeout) {
                metrics::header_timed_out();
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// Errors of one incoming connection (it was reset before we took it), not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
