//! Outages of real dependencies: a Redis server of the test's own that is killed and
//! restarted, and a PostgreSQL or MySQL connection cut by a TCP proxy. The service answers 503 while a
//! dependency is gone and recovers by itself, without a restart.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{free_port, OwnRedis, TestEnv};
use countersink::app::AppState;
use countersink::counts::unread_counts;
use countersink::events::Event;
use countersink::flush::WhenBusy;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const WAIT: WhenBusy = WhenBusy::Wait(Duration::from_secs(10));

#[tokio::test]
async fn redis_outage_is_answered_503_and_recovers_without_a_restart() {
    let env = TestEnv::sqlite().await;
    let mut redis = OwnRedis::start(free_port());
    let mut core = env.core.clone();
    core.redis_url = redis.url();
    let state = AppState::new(&core, None).unwrap();

    state.store.apply(&[Event::save(1, 9, true, true)]).await.unwrap();
    redis.kill();
    let during = state.store.apply(&[Event::save(2, 9, true, true)]).await.unwrap_err();
    assert!(during.is_unavailable(), "{during}");
    let read = unread_counts(&state.store, &state.db, &[9]).await.unwrap_err();
    assert!(read.is_unavailable(), "{read}");

    let _redis = OwnRedis::start(redis.port);
    // The sender retries; the same state object reconnects by itself.
    let mut recovered = None;
    for _ in 0..50 {
        match state.store.apply(&[Event::save(2, 9, true, true)]).await {
            Ok(outcome) => {
                recovered = Some(outcome);
                break;
            }
            Err(e) => assert!(e.is_unavailable(), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recovered.map(|o| o.changed), Some(1));
    // A second retry of the same event is harmless.
    assert_eq!(state.store.apply(&[Event::save(2, 9, true, true)]).await.unwrap().changed, 0);
    // This Redis keeps nothing on disk: the first event was lost with it (the reconcile
    // repairs that); what arrived after the restart is counted once.
    assert_eq!(unread_counts(&state.store, &state.db, &[9]).await.unwrap()[0].unread_count, 1);
}

/// Forwards a local port to a database server; `cut` drops every connection and stops listening.
struct Proxy {
    address: SocketAddr,
    tasks: JoinSet<()>,
}

impl Proxy {
    async fn start(address: SocketAddr, server: &'static str) -> Proxy {
        let listener = TcpListener::bind(address).await.unwrap();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(server).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy { address, tasks }
    }

    fn cut(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every forwarded connection.
        self.tasks.abort_all();
    }
}

#[tokio::test]
async fn database_outage_during_a_flush_keeps_the_deltas_for_the_next_flush() {
    for (env, server) in [(TestEnv::postgres().await, "127.0.0.1:5432"), (TestEnv::mysql().await, "127.0.0.1:3306")] {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut proxy = Proxy::start(address, server).await;
        let mut core = env.core.clone();
        core.database_url = env.core.database_url.replace(server, &proxy.address.to_string());
        core.db_timeout_secs = 1;
        let state = AppState::new(&core, None).unwrap();

        state.store.apply(&[Event::save(1, 3, true, true), Event::save(2, 3, true, true)]).await.unwrap();
        state.flusher.flush(WAIT).await.unwrap();
        state.store.apply(&[Event::save(3, 3, true, true)]).await.unwrap();

        proxy.cut();
        let failed = state.flusher.flush(WAIT).await.unwrap_err();
        assert!(failed.is_unavailable(), "{failed} on {server}");
        assert!(unread_counts(&state.store, &state.db, &[3]).await.unwrap_err().is_unavailable());

        let _proxy = Proxy::start(address, server).await;
        let report = state.flusher.flush(WAIT).await.unwrap();
        assert_eq!(report.users_written, 1, "{report:?} on {server}");
        let count = unread_counts(&state.store, &state.db, &[3]).await.unwrap()[0];
        assert_eq!((count.stored, count.pending), (3, 0), "on {server}");
    }
}
