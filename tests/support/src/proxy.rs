//! A TCP proxy in front of a database server, so a test can cut the database away from the service
//! (every connection dropped, new ones refused) and bring it back, without touching the server
//! the other tests share.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Forwards a local port to a server; `cut` drops every connection and stops listening.
pub struct Proxy {
    /// Where it listens.
    pub address: SocketAddr,
    /// Where it forwards to (`host:port`).
    server: &'static str,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Listens on `address` (pick the port with [`super::free_port`]; reuse it after a cut) and
    /// forwards to `server`, e.g. `127.0.0.1:5432`.
    pub async fn start(address: SocketAddr, server: &'static str) -> Proxy {
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
        Proxy { address, server, tasks }
    }

    /// A database URL like `url` that goes through this proxy.
    pub fn url_through(&self, url: &str) -> String {
        url.replace(self.server, &self.address.to_string())
    }

    /// Drops every forwarded connection and stops listening.
    pub fn cut(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every forwarded connection.
        self.tasks.abort_all();
    }
}
