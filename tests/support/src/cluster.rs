//! A Redis Cluster of the test's own on loopback ports: 3 masters and 3 replicas
//! (`redis-cli --cluster create`), whose nodes give up on a master that stops answering after a
//! second, so its replica is promoted.

use std::process::Command;
use std::time::Duration;

use super::free_port;
use super::sentinel::{redis_server, wait_for, Running};

/// The processes of one cluster, killed when dropped.
pub struct ClusterSetup {
    /// Every node's port, masters first as `redis-cli --cluster create` paired them.
    pub ports: Vec<u16>,
    nodes: Vec<Option<Running>>,
    _dir: tempfile::TempDir,
}

impl ClusterSetup {
    /// Starts six nodes, joins them into a cluster of 3 masters with a replica each, and waits
    /// until every node says the cluster is up and each master has its replica.
    pub fn start() -> ClusterSetup {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..6).map(|_| cluster_port()).collect();
        let nodes = ports
            .iter()
            .map(|port| {
                let conf = format!("nodes-{port}.conf");
                Some(redis_server(
                    dir.path(),
                    &[
                        "--port",
                        &port.to_string(),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-node-timeout",
                        "1000",
                    ],
                ))
            })
            .collect();
        let addresses: Vec<String> = ports.iter().map(|port| format!("127.0.0.1:{port}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli must be on PATH for these tests");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let setup = ClusterSetup { ports, nodes, _dir: dir };
        wait_for(Duration::from_secs(30), "every node to see the cluster up with its replicas", || {
            setup.ports.iter().all(|&port| {
                cluster_info(port)
                    .is_some_and(|info| info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6"))
            }) && setup.masters().len() == 3
                && setup.ports.iter().all(|&port| role(port).is_some_and(|r| r == "master" || replica_in_sync(port)))
        });
        setup
    }

    /// Two nodes' addresses, as `--redis-cluster-nodes` takes them: a client needs only a few.
    pub fn addresses(&self) -> String {
        format!("127.0.0.1:{},127.0.0.1:{}", self.ports[0], self.ports[4])
    }

    /// The ports of the nodes that are masters now.
    pub fn masters(&self) -> Vec<u16> {
        self.ports.iter().copied().filter(|&port| role(port).as_deref() == Some("master")).collect()
    }

    /// The port of the master serving the slot of `key` now, as a live node says.
    pub fn master_of(&self, key: &str) -> Option<u16> {
        self.ports.iter().enumerate().filter(|(i, _)| self.nodes[*i].is_some()).find_map(|(_, &port)| {
            let mut conn = connection(port)?;
            let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut conn).ok()?;
            let ranges: Vec<(i64, i64, (String, u16))> = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query::<Vec<redis::Value>>(&mut conn)
                .ok()?
                .into_iter()
                .filter_map(|range| {
                    let parts: Vec<redis::Value> = redis::from_redis_value(range).ok()?;
                    let start: i64 = redis::from_redis_value_ref(parts.first()?).ok()?;
                    let end: i64 = redis::from_redis_value_ref(parts.get(1)?).ok()?;
                    let master: Vec<redis::Value> = redis::from_redis_value_ref(parts.get(2)?).ok()?;
                    let host: String = redis::from_redis_value_ref(master.first()?).ok()?;
                    let port: u16 = redis::from_redis_value_ref(master.get(1)?).ok()?;
                    Some((start, end, (host, port)))
                })
                .collect();
            ranges.into_iter().find(|(start, end, _)| (*start..=*end).contains(&slot)).map(|(_, _, (_, port))| port)
        })
    }

    /// Kills the node on `port` without a word (SIGKILL): if it was a master, the others promote
    /// its replica about a second later.
    pub fn kill(&mut self, port: u16) {
        let at = self.ports.iter().position(|&p| p == port).expect("a node of this cluster");
        if let Some(mut node) = self.nodes[at].take() {
            node.stop();
        }
    }

    /// Asks the replica of the master on `master` to take over (`CLUSTER FAILOVER` on it): the
    /// master, still running, becomes its replica and answers `MOVED` for the slot. Returns the
    /// replica's port.
    pub fn request_failover(&self, master: u16) -> u16 {
        let replica = self
            .ports
            .iter()
            .copied()
            .find(|&port| {
                super::sentinel::info(port, "replication")
                    .is_some_and(|info| info.contains("role:slave") && info.contains(&format!("master_port:{master}")))
            })
            .expect("the master has a replica");
        let mut conn = connection(replica).expect("the replica answers");
        let answer: String = redis::cmd("CLUSTER").arg("FAILOVER").query(&mut conn).unwrap();
        assert_eq!(answer, "OK", "CLUSTER FAILOVER was refused");
        replica
    }

    /// Waits until a node other than `old_master` serves the slot of `key`.
    pub fn wait_for_failover(&self, key: &str, old_master: u16) -> u16 {
        let mut promoted = None;
        wait_for(Duration::from_secs(30), "the replica's promotion", || {
            promoted = self.master_of(key).filter(|&port| port != old_master);
            promoted.is_some()
        });
        promoted.unwrap()
    }
}

/// A free port for a node whose cluster bus port (10,000 above it; Redis refuses a node above
/// 55,535) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn connection(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?.get_connection().ok()
}

fn cluster_info(port: u16) -> Option<String> {
    redis::cmd("CLUSTER").arg("INFO").query(&mut connection(port)?).ok()
}

fn role(port: u16) -> Option<String> {
    let info = super::sentinel::info(port, "replication")?;
    info.lines().find_map(|line| line.strip_prefix("role:")).map(|role| role.trim().to_string())
}

fn replica_in_sync(port: u16) -> bool {
    super::sentinel::info(port, "replication").is_some_and(|info| info.contains("master_link_status:up"))
}
