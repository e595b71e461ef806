//! The load generator: N keep-alive HTTP/1.1 connections, each sending its next request as soon
//! as the last answer arrives (a closed loop), for a fixed time; latencies go into a histogram.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Builds the next request of a connection; `conn` is the connection's index.
pub type MakeRequest = Arc<dyn Fn(usize) -> Request<Full<Bytes>> + Send + Sync>;

/// Checks a successful answer's body; `false` counts the answer as wrong.
pub type CheckAnswer = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measured {
    /// Requests answered with a 2xx during the measured window.
    pub requests: u64,
    /// Requests answered otherwise (counted, not in the latencies).
    pub errors: u64,
    /// Successful answers whose body failed the scenario's check (a wrong count).
    pub wrong: u64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Events per second (requests/s times events per request).
    pub events_per_s: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Worst latency, milliseconds.
    pub max_ms: f64,
}

/// Latencies up to 60 s, 3 significant digits, in microseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!("constant bounds are valid"))
}

/// Summarises a window of `elapsed` with `events_per_request`.
pub fn summarise(hist: &Histogram<u64>, errors: u64, elapsed: Duration, events_per_request: u64) -> Measured {
    let requests = hist.len();
    let per_s = requests as f64 / elapsed.as_secs_f64();
    Measured {
        requests,
        errors,
        wrong: 0,
        requests_per_s: per_s,
        events_per_s: per_s * events_per_request as f64,
        p50_ms: hist.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
    }
}

/// Runs `connections` closed loops against `addr` for `warmup + measure`; only requests that
/// start after the warm-up are counted.
pub async fn run_http(
    addr: SocketAddr,
    connections: usize,
    warmup: Duration,
    measure: Duration,
    events_per_request: u64,
    make: MakeRequest,
) -> anyhow::Result<Measured> {
    run_http_checked(addr, connections, warmup, measure, events_per_request, make, None).await
}

/// [`run_http`], checking every successful answer (warm-up included) with `check`.
pub async fn run_http_checked(
    addr: SocketAddr,
    connections: usize,
    warmup: Duration,
    measure: Duration,
    events_per_request: u64,
    make: MakeRequest,
    check: Option<CheckAnswer>,
) -> anyhow::Result<Measured> {
    let start = Instant::now();
    let from = start + warmup;
    let until = from + measure;
    let mut tasks = Vec::with_capacity(connections);
    for conn in 0..connections {
        let (make, check) = (make.clone(), check.clone());
        tasks.push(tokio::spawn(async move { one_connection(addr, conn, from, until, make, check).await }));
    }
    let mut total = histogram();
    let (mut errors, mut wrong) = (0, 0);
    for task in tasks {
        let (hist, errs, wrongs) = task.await.context("load task panicked")??;
        total.add(hist).context("merging histograms")?;
        errors += errs;
        wrong += wrongs;
    }
    Ok(Measured { wrong, ..summarise(&total, errors, measure, events_per_request) })
}

async fn one_connection(
    addr: SocketAddr,
    conn: usize,
    from: Instant,
    until: Instant,
    make: MakeRequest,
    check: Option<CheckAnswer>,
) -> anyhow::Result<(Histogram<u64>, u64, u64)> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut hist = histogram();
    let (mut errors, mut wrong) = (0, 0);
    loop {
        let started = Instant::now();
        if started >= until {
            break;
        }
        let response = sender.send_request(make(conn)).await.context("sending a request")?;
        let status = response.status();
        let body = response.into_body().collect().await.context("reading an answer")?.to_bytes();
        if status.is_success() && check.as_ref().is_some_and(|check| !check(&body)) {
            wrong += 1;
            if wrong == 1 {
                eprintln!("  first wrong answer: {}", String::from_utf8_lossy(&body));
            }
        }
        if started < from {
            continue;
        }
        if status.is_success() {
            hist.record(started.elapsed().as_micros().max(1) as u64)?;
        } else {
            errors += 1;
            if errors == 1 {
                eprintln!("  first error: {status} {}", String::from_utf8_lossy(&body));
            }
        }
    }
    Ok((hist, errors, wrong))
}

/// Sends `requests` requests over `connections` keep-alive connections, as fast as they are
/// answered; returns how many answers were errors or failed `check`.
pub async fn run_requests(
    addr: SocketAddr,
    connections: usize,
    requests: usize,
    make: MakeRequest,
    check: Option<CheckAnswer>,
) -> anyhow::Result<u64> {
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(requests));
    let mut tasks = Vec::with_capacity(connections);
    for conn in 0..connections {
        let (make, check, left) = (make.clone(), check.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let mut bad = 0u64;
            while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                let response = sender.send_request(make(conn)).await.context("sending a request")?;
                let ok = response.status().is_success();
                let body = response.into_body().collect().await.context("reading an answer")?.to_bytes();
                if !ok || check.as_ref().is_some_and(|check| !check(&body)) {
                    bad += 1;
                }
            }
            anyhow::Ok(bad)
        }));
    }
    let mut bad = 0;
    for task in tasks {
        bad += task.await.context("load task panicked")??;
    }
    Ok(bad)
}

/// Runs `tasks` closed loops of an async operation (no HTTP) for `warmup + measure`.
pub async fn run_loops<F, Fut>(
    tasks: usize,
    warmup: Duration,
    measure: Duration,
    events_per_op: u64,
    op: F,
) -> anyhow::Result<Measured>
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let from = Instant::now() + warmup;
    let until = from + measure;
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let op = op.clone();
        handles.push(tokio::spawn(async move {
            let mut hist = histogram();
            loop {
                let started = Instant::now();
                if started >= until {
                    break;
                }
                op(task).await?;
                if started >= from {
                    hist.record(started.elapsed().as_micros().max(1) as u64)?;
                }
            }
            anyhow::Ok(hist)
        }));
    }
    let mut total = histogram();
    for handle in handles {
        total.add(handle.await.context("loop task panicked")??).context("merging histograms")?;
    }
    Ok(summarise(&total, 0, measure, events_per_op))
}
