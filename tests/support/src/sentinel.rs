//! A Redis Sentinel set-up of the test's own on loopback ports: a master, one replica and three
//! Sentinels (quorum 2) that fail over a second after the master stops answering.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// The processes of one set-up, killed when dropped.
pub struct SentinelSetup {
    /// The first master's port (the replica's is `replica_port`).
    pub master_port: u16,
    /// The replica's port: the master after a failover.
    pub replica_port: u16,
    /// The Sentinels' ports.
    pub sentinel_ports: Vec<u16>,
    /// The name the Sentinels monitor the master under: one of this set-up's own, so a Sentinel
    /// of another test (still monitoring a master whose port this one's master now has) is not
    /// taken for one of ours.
    pub master_name: String,
    /// The password the Sentinels require, if any.
    password: Option<String>,
    master: Running,
    replica: Running,
    _sentinels: Vec<Running>,
    _dir: tempfile::TempDir,
}

impl SentinelSetup {
    /// Starts every process and waits until the Sentinels know the master, its replica and each
    /// other (what a failover needs).
    pub fn start() -> SentinelSetup {
        Self::start_with(None)
    }

    /// [`SentinelSetup::start`], with Sentinels that require `password` (`requirepass`) from
    /// their clients and each other.
    pub fn start_with_password(password: &str) -> SentinelSetup {
        Self::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> SentinelSetup {
        let dir = tempfile::tempdir().unwrap();
        let (master_port, replica_port) = (free_port(), free_port());
        let master = redis_server(dir.path(), &["--port", &master_port.to_string()]);
        let replica = redis_server(
            dir.path(),
            &["--port", &replica_port.to_string(), "--replicaof", "127.0.0.1", &master_port.to_string()],
        );
        wait_for(Duration::from_secs(10), "the replica to sync", || {
            info(replica_port, "replication").is_some_and(|info| info.contains("master_link_status:up"))
        });
        let sentinel_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let master_name = format!("countersink-test-{:016x}", rand::random::<u64>());
        let sentinels = sentinel_ports
            .iter()
            .map(|port| {
                let conf = dir.path().join(format!("sentinel-{port}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                         sentinel monitor {master_name} 127.0.0.1 {master_port} 2\n\
                         sentinel down-after-milliseconds {master_name} 1000\n\
                         sentinel failover-timeout {master_name} 10000\n{auth}",
                        dir = dir.path().display(),
                        auth = password
                            .map_or(String::new(), |p| format!("requirepass {p}\nsentinel sentinel-pass {p}\n")),
                    ),
                )
                .unwrap();
                let child = Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("redis-server must be on PATH for these tests");
                Running(child)
            })
            .collect();
        let setup = SentinelSetup {
            master_port,
            replica_port,
            sentinel_ports,
            master_name,
            password: password.map(String::from),
            master,
            replica,
            _sentinels: sentinels,
            _dir: dir,
        };
        for &port in &setup.sentinel_ports {
            // Replicas are learnt from the master's INFO and Sentinels from hello messages every
            // 2 s; a loaded CI machine has taken longer than 20 s.
            wait_for(Duration::from_secs(40), "each Sentinel to know the replica and the other Sentinels", || {
                let known = |what: &str| {
                    sentinel_query::<Vec<redis::Value>>(port, password, &[what, setup.master_name.as_str()])
                        .map_or(0, |list| list.len())
                };
                known("replicas") == 1 && known("sentinels") == 2
            });
        }
        setup
    }

    /// The Sentinels' addresses, as `--redis-sentinels` takes them.
    pub fn addresses(&self) -> String {
        self.sentinel_ports.iter().map(|port| format!("127.0.0.1:{port}")).collect::<Vec<_>>().join(",")
    }

    /// The Sentinels' URLs with their password, as `--redis-sentinels` also takes them.
    pub fn urls(&self) -> String {
        let password = self.password.as_deref().unwrap_or_default();
        self.sentinel_ports
            .iter()
            .map(|port| format!("redis://:{password}@127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The master's port, as the first Sentinel that answers says.
    pub fn master_port_now(&self) -> Option<u16> {
        self.sentinel_ports.iter().find_map(|&port| {
            let (_, master_port): (String, u16) = sentinel_query(
                port,
                self.password.as_deref(),
                &["get-master-addr-by-name", self.master_name.as_str()],
            )?;
            Some(master_port)
        })
    }

    /// Asks a Sentinel to fail over now (`SENTINEL FAILOVER`): the replica is promoted and the
    /// master, still running, becomes its replica.
    pub fn request_failover(&self) {
        let answer: Option<String> =
            sentinel_query(self.sentinel_ports[0], self.password.as_deref(), &["failover", self.master_name.as_str()]);
        assert_eq!(answer.as_deref(), Some("OK"), "SENTINEL FAILOVER was refused");
    }

    /// Whether the first master now says it is a replica (after [`SentinelSetup::request_failover`]).
    pub fn old_master_is_a_replica(&self) -> bool {
        info(self.master_port, "replication").is_some_and(|info| info.contains("role:slave"))
    }

    /// Kills the replica (SIGKILL); [`SentinelSetup::restart_replica`] starts it again.
    pub fn kill_replica(&mut self) {
        self.replica.stop();
    }

    /// Stops the replica (SIGSTOP): still connected, it takes and acknowledges nothing more.
    pub fn pause_replica(&self) {
        signal(&self.replica, "-STOP");
    }

    /// Lets a paused replica go on (SIGCONT).
    pub fn resume_replica(&self) {
        signal(&self.replica, "-CONT");
    }

    /// Starts the replica again, replicating the first master, and waits until it is in sync.
    pub fn restart_replica(&mut self) {
        let (port, master) = (self.replica_port.to_string(), self.master_port.to_string());
        self.replica = redis_server(self._dir.path(), &["--port", &port, "--replicaof", "127.0.0.1", &master]);
        wait_for(Duration::from_secs(10), "the replica to sync", || {
            info(self.replica_port, "replication").is_some_and(|info| info.contains("master_link_status:up"))
        });
    }

    /// Kills the master without a word (SIGKILL): the Sentinels then promote the replica.
    pub fn kill_master(&mut self) {
        self.master.stop();
    }
}

/// A redis-server on the port `args` names, keeping its files in a folder of its own under
/// `dir` (a replica writes the snapshot it syncs from; left in the working directory, every
/// later test's Redis started there would load it).
pub(crate) fn redis_server(dir: &std::path::Path, args: &[&str]) -> Running {
    let port: u16 = args[1].parse().unwrap();
    let own_dir = dir.join(format!("redis-{port}"));
    std::fs::create_dir_all(&own_dir).unwrap();
    let child = Running(
        Command::new("redis-server")
            .args(args)
            .arg("--dir")
            .arg(&own_dir)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH for these tests"),
    );
    wait_for(Duration::from_secs(5), "redis-server to start", || info(port, "server").is_some());
    child
}

pub(crate) fn info(port: u16, section: &str) -> Option<String> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?.get_connection().ok()?;
    redis::cmd("INFO").arg(section).query(&mut conn).ok()
}

fn sentinel_query<T: redis::FromRedisValue>(port: u16, password: Option<&str>, args: &[&str]) -> Option<T> {
    let auth = password.map_or(String::new(), |p| format!(":{p}@"));
    let mut conn = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}")).ok()?.get_connection().ok()?;
    redis::cmd("SENTINEL").arg(args).query(&mut conn).ok()
}

pub(crate) fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Running, signal: &str) {
    let status = Command::new("kill").arg(signal).arg(child.0.id().to_string()).status().unwrap();
    assert!(status.success(), "kill {signal} failed");
}

/// A process of the set-up, killed when dropped, also when a wait of [`SentinelSetup::start`]
/// fails before the set-up is whole.
pub(crate) struct Running(Child);

impl Running {
    pub(crate) fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}
