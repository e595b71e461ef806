//! What countersink's test binaries share (`support::` in them), compiled once for all of them.
//!
//! Test isolation: each test gets its own Redis key prefix and its own PostgreSQL schema (or
//! MySQL database, or SQLite file), against the real services, and removes them when it ends
//! ([`TestEnv`]). Beside it: a redis-server of a test's own ([`OwnRedis`]), the real binary
//! ([`sidecar`]), a TCP proxy that cuts a database away ([`proxy`]) and a stand-in for a Django
//! site ([`world`]).
// A helper that cannot set up what a test asked for fails that test: it panics.
#![allow(clippy::unwrap_used)]

pub mod cluster;
pub mod proxy;
pub mod sentinel;
pub mod sidecar;
pub mod world;

use std::time::Duration;

use countersink::app::AppState;
use countersink::config::CoreConfig;
use countersink::db::Backend;
use diesel::{Connection, MysqlConnection, PgConnection, RunQueryDsl};

/// The PostgreSQL server tests use; each test works in a schema of its own there.
pub fn postgres_url() -> String {
    std::env::var("COUNTERSINK_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The MySQL (or MariaDB) server tests use; each test works in a database of its own there.
pub fn mysql_url() -> String {
    std::env::var("COUNTERSINK_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// `mysql_url()` with its database replaced by `database` (the test's own).
fn mysql_url_for(database: &str) -> String {
    let url = mysql_url();
    let (base, query) = url.split_once('?').map_or((url.as_str(), ""), |(base, query)| (base, query));
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let server = base[host_start..].find('/').map_or(base, |i| &base[..host_start + i]);
    if query.is_empty() {
        format!("{server}/{database}")
    } else {
        format!("{server}/{database}?{query}")
    }
}

/// The Redis server tests use; each test works under a key prefix of its own there.
pub fn redis_url() -> String {
    std::env::var("COUNTERSINK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A unique name for this test's schema and key prefix.
fn unique_name() -> String {
    format!("cstest_{:016x}", rand::random::<u64>())
}

/// One test's isolated Redis prefix and database, dropped when the test ends.
pub struct TestEnv {
    /// The settings pointing at this test's prefix and database.
    pub core: CoreConfig,
    name: String,
    schema: Option<String>,
    _mysql_database: Option<MysqlDatabase>,
    _sqlite_dir: Option<tempfile::TempDir>,
}

impl TestEnv {
    /// A fresh PostgreSQL schema and Redis prefix, migrated.
    pub async fn postgres() -> TestEnv {
        let name = unique_name();
        let mut admin = PgConnection::establish(&postgres_url()).unwrap();
        diesel::sql_query(format!("CREATE SCHEMA {name}")).execute(&mut admin).unwrap();
        // libpq's `options` puts every pooled connection in the test's schema.
        let url = format!("{}?options=-csearch_path%3D{name}", postgres_url());
        let mut env = Self::unmigrated(name.clone(), url, None);
        env.schema = Some(name);
        env.migrate().await
    }

    /// A fresh MySQL database and Redis prefix, migrated.
    pub async fn mysql() -> TestEnv {
        let database = MysqlDatabase::create();
        let mut env = Self::unmigrated(database.name.clone(), database.url.clone(), None);
        env._mysql_database = Some(database);
        env.migrate().await
    }

    /// A fresh SQLite file and Redis prefix, migrated.
    pub async fn sqlite() -> TestEnv {
        let name = unique_name();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("counts.sqlite3").display());
        Self::unmigrated(name, url, Some(dir)).migrate().await
    }

    /// Every backend, for tests that must hold on each.
    pub async fn each_backend() -> Vec<TestEnv> {
        vec![Self::postgres().await, Self::sqlite().await, Self::mysql().await]
    }

    /// An environment on `url`; created before the migrations run, so Drop cleans up after a
    /// failed migration too.
    fn unmigrated(name: String, url: String, dir: Option<tempfile::TempDir>) -> TestEnv {
        TestEnv { core: core_config(&name, &url), name, schema: None, _mysql_database: None, _sqlite_dir: dir }
    }

    async fn migrate(self) -> TestEnv {
        self.state().db.migrate().await.unwrap();
        self
    }

    /// Every backend with a Notification table `notifications_notification(id, recipient_id,
    /// unread, deleted)` configured as the reconcile source.
    pub async fn each_backend_with_source() -> Vec<TestEnv> {
        let mut envs = Self::each_backend().await;
        for env in &mut envs {
            env.add_notification_table().await;
        }
        envs
    }

    /// A PostgreSQL schema with the Notification table configured as the source.
    pub async fn postgres_with_source() -> TestEnv {
        let mut env = Self::postgres().await;
        env.add_notification_table().await;
        env
    }

    /// A MySQL database with the Notification table configured as the source.
    pub async fn mysql_with_source() -> TestEnv {
        let mut env = Self::mysql().await;
        env.add_notification_table().await;
        env
    }

    /// A SQLite file with the Notification table configured as the source.
    pub async fn sqlite_with_source() -> TestEnv {
        let mut env = Self::sqlite().await;
        env.add_notification_table().await;
        env
    }

    /// Creates the Notification table and points the source mapping at it.
    pub async fn add_notification_table(&mut self) {
        let ddl = match self.backend() {
            Backend::Postgres => {
                "CREATE TABLE notifications_notification (id BIGSERIAL PRIMARY KEY, recipient_id BIGINT NOT NULL, \
                 unread BOOLEAN NOT NULL, deleted BOOLEAN NOT NULL DEFAULT FALSE)"
            }
            Backend::Sqlite => {
                "CREATE TABLE notifications_notification (id INTEGER PRIMARY KEY AUTOINCREMENT, recipient_id BIGINT NOT NULL, \
                 unread BOOLEAN NOT NULL, deleted BOOLEAN NOT NULL DEFAULT FALSE)"
            }
            Backend::Mysql => {
                "CREATE TABLE notifications_notification (id BIGINT AUTO_INCREMENT PRIMARY KEY, recipient_id BIGINT NOT NULL, \
                 unread BOOLEAN NOT NULL, deleted BOOLEAN NOT NULL DEFAULT FALSE) ENGINE = InnoDB"
            }
        };
        self.sql(ddl).await;
        self.core.source = countersink::config::SourceConfig {
            source_table: Some("notifications_notification".into()),
            source_deleted_column: Some("deleted".into()),
            ..countersink::config::SourceConfig::default()
        };
        // With a source, events wait for a bootstrap; the table is empty, so this is instant.
        self.state()
            .bootstrapper
            .bootstrap(countersink::bootstrap::Batching::default(), countersink::bootstrap::Rebuild::Always, |_| {})
            .await
            .unwrap();
    }

    /// Runs one SQL statement on this test's database (the Django side writing behind our back).
    pub async fn sql(&self, statement: &str) -> usize {
        let statement = statement.to_string();
        self.state().db.run(move |conn| Ok(diesel::sql_query(statement).execute(conn)?)).await.unwrap()
    }

    /// Unread, undeleted notifications per user, as Django's `.count()` would say.
    pub async fn true_counts(&self) -> std::collections::HashMap<u64, i64> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            user_id: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            unread: i64,
        }
        let rows: Vec<Row> = self
            .state()
            .db
            .run(|conn| {
                Ok(diesel::sql_query(
                    "SELECT recipient_id AS user_id, COUNT(*) AS unread \
                     FROM notifications_notification WHERE unread AND NOT deleted GROUP BY recipient_id",
                )
                .load(conn)?)
            })
            .await
            .unwrap();
        rows.into_iter().map(|r| (r.user_id as u64, r.unread)).collect()
    }

    /// The count table, without zero rows.
    pub async fn stored_counts(&self) -> std::collections::HashMap<u64, i64> {
        use countersink::db::schema::countersink_usernotificationscount::dsl::*;
        use diesel::{ExpressionMethods, QueryDsl};
        let rows: Vec<(i64, i64)> = self
            .state()
            .db
            .run(|conn| {
                Ok(countersink_usernotificationscount
                    .select((user_id, unread_count))
                    .filter(unread_count.ne(0))
                    .load(conn)?)
            })
            .await
            .unwrap();
        rows.into_iter().map(|(u, n)| (u as u64, n)).collect()
    }

    /// A fresh application state over this test's prefix and database.
    pub fn state(&self) -> AppState {
        AppState::new(&self.core, None).unwrap()
    }

    /// The backend under test.
    pub fn backend(&self) -> Backend {
        Backend::from_url(&self.core.database_url).unwrap()
    }

    /// A Redis connection for inspecting or breaking this test's keys.
    pub fn redis(&self) -> redis::Connection {
        redis::Client::open(self.core.redis_url.as_str()).unwrap().get_connection().unwrap()
    }

    /// Lets the reconciled pictures of this test's reconciles expire now, as two minutes after
    /// the reconcile would (`{P}:reconciled:{user}`).
    pub fn expire_reconciled_pictures(&self) {
        let pictures: Vec<String> = self.redis_keys().into_iter().filter(|k| k.contains(":reconciled:")).collect();
        if !pictures.is_empty() {
            redis::cmd("DEL").arg(pictures).exec(&mut self.redis()).unwrap();
        }
    }

    /// Redis's bytes (`MEMORY USAGE`) for this test's keys whose names contain `part`, and how
    /// many keys there are.
    pub fn memory_of(&self, part: &str) -> (u64, usize) {
        let mut redis = self.redis();
        let keys: Vec<String> = self.redis_keys().into_iter().filter(|k| k.contains(part)).collect();
        let bytes = keys
            .iter()
            .map(|key| -> u64 {
                redis::cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0).query(&mut redis).unwrap()
            })
            .sum();
        (bytes, keys.len())
    }

    /// The buckets of this test's packed idempotency records (`records.lua`): the hashes
    /// `{P}:webhooks:<ttl>:<epoch>:<bucket>`, not the epochs' bucket and record counts.
    pub fn idempotency_buckets(&self) -> Vec<String> {
        let records = self.key("webhooks:");
        self.redis_keys()
            .into_iter()
            .filter(|k| {
                k.strip_prefix(&records).is_some_and(|r| {
                    let parts: Vec<&str> = r.split(':').collect();
                    parts.len() == 3 && parts[2].parse::<u64>().is_ok()
                })
            })
            .collect()
    }

    /// How many idempotency records this test holds, packed or (as the former version wrote
    /// them) one key each.
    pub fn idempotency_records(&self) -> u64 {
        let mut redis = self.redis();
        let packed: u64 = self
            .idempotency_buckets()
            .iter()
            // Each bucket also holds the empty field its writer made it with.
            .map(|bucket| -> u64 { redis::cmd("HLEN").arg(bucket).query::<u64>(&mut redis).unwrap() - 1 })
            .sum();
        packed + self.redis_keys().iter().filter(|k| k.contains(":webhook:")).count() as u64
    }

    /// The bucket that holds `webhook_id`'s record, if one does.
    pub fn idempotency_bucket_of(&self, webhook_id: &str) -> Option<String> {
        let field = countersink::store::Idempotency::new(webhook_id, b"", std::time::Duration::ZERO).record_field;
        let mut redis = self.redis();
        self.idempotency_buckets()
            .into_iter()
            .find(|bucket| redis::cmd("HEXISTS").arg(bucket).arg(&field[..]).query::<bool>(&mut redis).unwrap())
    }

    /// Every key this test holds in Redis, sorted.
    pub fn redis_keys(&self) -> Vec<String> {
        scan_keys(&mut self.redis(), &self.key("*"))
    }

    /// The key prefix as the store writes it (with its hash-tag braces).
    pub fn key(&self, suffix: &str) -> String {
        format!("{{{}}}:{suffix}", self.name)
    }

    /// Puts Redis back as a snapshot taken when user 5 had one unread notification (id 1, pending
    /// and read once, so its count held), before notification 2 arrived and was flushed: pending
    /// `{5: 1}`, held count 1, hand-off sequence 0, a ready marker of then, notification 2 unseen.
    pub fn restore_snapshot_of_one_unread(&self) {
        let mut redis = self.redis();
        let _: () = redis::Commands::zadd(&mut redis, self.key("pending"), "5", 1).unwrap();
        let _: () = redis::Commands::set(&mut redis, self.key("handoff_seq"), 0).unwrap();
        let _: () = redis::Commands::set(&mut redis, self.key("ready"), "restored").unwrap();
        let _: () = redis::Commands::hset(&mut redis, self.key("counts:0"), "5", 1).unwrap();
        redis::cmd("BITFIELD").arg(self.key("state:0")).arg("SET").arg("u2").arg("#2").arg(0).exec(&mut redis).unwrap();
    }
}

fn scan_keys(redis: &mut redis::Connection, pattern: &str) -> Vec<String> {
    let mut keys: Vec<String> = match redis::Commands::scan_match(redis, pattern) {
        Ok(iter) => iter.filter_map(Result::ok).collect(),
        Err(_) => Vec::new(),
    };
    keys.sort();
    keys
}

/// Settings for a test: small flush chunks, so chunking is exercised with few users.
pub fn core_config(prefix: &str, database_url: &str) -> CoreConfig {
    CoreConfig {
        redis_url: redis_url(),
        redis_prefix: prefix.to_string(),
        redis_sentinels: Vec::new(),
        redis_sentinel_master: None,
        redis_cluster_nodes: Vec::new(),
        database_url: database_url.to_string(),
        db_pool_size: 4,
        db_timeout_secs: 5,
        flush_chunk_users: 100,
        flush_lock_ttl_secs: 30,
        flush_timeout_secs: 30,
        source: countersink::config::SourceConfig::default(),
        worker_threads: None,
        log_format: countersink::config::LogFormat::Text,
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Ok(mut redis) = redis::Client::open(self.core.redis_url.as_str()).and_then(|c| c.get_connection()) {
            let keys = scan_keys(&mut redis, &self.key("*"));
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut redis);
            }
        }
        if let Some(schema) = &self.schema {
            if let Ok(mut admin) = PgConnection::establish(&postgres_url()) {
                let _ = diesel::sql_query(format!("DROP SCHEMA {schema} CASCADE")).execute(&mut admin);
            }
        }
    }
}

/// An empty MySQL database of a test's own, dropped when the test ends.
pub struct MysqlDatabase {
    /// Its URL.
    pub url: String,
    name: String,
}

impl MysqlDatabase {
    /// Creates one on the server of [`mysql_url`].
    pub fn create() -> MysqlDatabase {
        let name = unique_name();
        let mut admin = MysqlConnection::establish(&mysql_url()).unwrap();
        diesel::sql_query(format!("CREATE DATABASE {name} CHARACTER SET utf8mb4")).execute(&mut admin).unwrap();
        MysqlDatabase { url: mysql_url_for(&name), name }
    }
}

impl Drop for MysqlDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = MysqlConnection::establish(&mysql_url()) {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {}", self.name)).execute(&mut admin);
        }
    }
}

/// Polls `f` until it returns true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// [`eventually`] for a check that awaits (an HTTP call): true as soon as `check` answers true.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check().await
}

/// A throwaway redis-server of the test's own, for tests that kill or flush Redis without
/// disturbing the tests running beside them.
pub struct OwnRedis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: std::process::Child,
    /// Where it keeps its snapshot (`dump.rdb`), for [`OwnRedis::restart`].
    dir: Option<std::path::PathBuf>,
    /// Whether it logs every write to an append-only file (and restarts from it).
    aof: bool,
    /// Without `dir`, an empty folder of its own for `--dir`: Redis would otherwise load a
    /// `dump.rdb` it found in the working directory (a replica leaves one there) and write there.
    _scratch: Option<tempfile::TempDir>,
}

impl OwnRedis {
    /// Starts one on `port` (pick it with [`free_port`]).
    pub fn start(port: u16) -> OwnRedis {
        Self::spawn(port, None, false)
    }

    /// Starts one on `port` that keeps its snapshot in `dir` (written by [`OwnRedis::save`] only)
    /// and loads it again when it restarts.
    pub fn start_with_snapshots(port: u16, dir: &std::path::Path) -> OwnRedis {
        Self::spawn(port, Some(dir.to_path_buf()), false)
    }

    fn spawn(port: u16, dir: Option<std::path::PathBuf>, aof: bool) -> OwnRedis {
        let mut command = std::process::Command::new("redis-server");
        command.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
        if aof {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        let scratch = match &dir {
            Some(dir) => {
                command.arg("--dir").arg(dir).args(["--dbfilename", "dump.rdb"]);
                None
            }
            None => {
                let scratch = tempfile::tempdir().unwrap();
                command.arg("--dir").arg(scratch.path());
                Some(scratch)
            }
        };
        let child =
            command.stdout(std::process::Stdio::null()).spawn().expect("redis-server must be on PATH for these tests");
        let redis = OwnRedis { port, child, dir, aof, _scratch: scratch };
        let client = redis::Client::open(redis.url()).unwrap();
        for _ in 0..250 {
            if let Ok(mut conn) = client.get_connection() {
                // Up, and done loading its snapshot.
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return redis;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {port}");
    }

    /// Writes a snapshot now (`SAVE`).
    pub fn save(&self) {
        let mut conn = redis::Client::open(self.url()).unwrap().get_connection().unwrap();
        redis::cmd("SAVE").exec(&mut conn).unwrap();
    }

    /// Kills it (nothing saved) and starts it again on the same port, from its last snapshot (or,
    /// after [`OwnRedis::enable_aof`], from its append-only file: nothing lost).
    pub fn restart(&mut self) {
        self.kill();
        *self = Self::spawn(self.port, self.dir.clone(), self.aof);
    }

    /// Kills it and starts it again from its last snapshot (`SAVE`), its append-only file, if
    /// any, left unread and off.
    pub fn restart_from_snapshot(&mut self) {
        self.aof = false;
        self.restart();
    }

    /// Turns on the append-only file with a sync after every write (`appendfsync always`), once
    /// it holds everything (its first rewrite done); a later [`OwnRedis::restart`] reads it.
    pub fn enable_aof(&mut self) {
        let mut conn = redis::Client::open(self.url()).unwrap().get_connection().unwrap();
        redis::cmd("CONFIG").arg(&["SET", "appendfsync", "always"][..]).exec(&mut conn).unwrap();
        redis::cmd("CONFIG").arg(&["SET", "appendonly", "yes"][..]).exec(&mut conn).unwrap();
        for _ in 0..500 {
            let info: String = redis::cmd("INFO").arg("persistence").query(&mut conn).unwrap();
            let rewritten = info.contains("aof_enabled:1")
                && info.contains("aof_rewrite_in_progress:0")
                && info.contains("aof_rewrite_scheduled:0");
            if rewritten {
                self.aof = true;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not finish its first append-only rewrite", self.port);
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
