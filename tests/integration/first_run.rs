//! What a newcomer meets in the first hour, against the real binary (issue #18): database
//! connection errors that carry what the database said, a `.env.sample` that works as it is,
//! quiet idle logs, a closed stdout or stderr that stops nothing, usage lines that hold, and a
//! README that explains every status and outcome the code can answer.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::CommandFactory;
use countersink::cli::Cli;
use support::TestEnv;

const BIN: &str = env!("CARGO_BIN_EXE_countersink");

/// `program` with no `COUNTERSINK_*` variable from the test's own environment.
fn clean(program: &str) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("COUNTERSINK_") {
            command.env_remove(name);
        }
    }
    command
}

/// The binary, see [`clean`].
fn countersink() -> Command {
    clean(BIN)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `migrate` against `url`, waiting at most a second for a connection.
fn migrate(url: &str) -> Output {
    countersink().args(["--database-url", url, "--db-timeout-secs", "1", "migrate"]).output().unwrap()
}

/// The server part of a test server's URL (`postgres://postgres@127.0.0.1:5432`), without its database.
fn server_of(url: &str) -> String {
    let start = url.find("://").unwrap() + 3;
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    url[..end].to_string()
}

#[test]
fn database_connection_errors_say_what_the_database_said() {
    let pg = server_of(&support::postgres_url());
    let my = server_of(&support::mysql_url());
    let dir = tempfile::tempdir().unwrap();
    let missing_folder = dir.path().join("no-such-folder");
    let sqlite = format!("sqlite://{}/counts.sqlite3", missing_folder.display());
    // (what is wrong, URL, what the message must say)
    let cases: Vec<(&str, String, String)> = vec![
        ("pg wrong port", "postgres://postgres@127.0.0.1:1/test".into(), "Connection refused".into()),
        (
            "pg missing database",
            format!("{pg}/cstest_no_such_db"),
            "database \"cstest_no_such_db\" does not exist".into(),
        ),
        (
            "pg unknown role",
            "postgres://cstest_nobody@127.0.0.1:5432/test".into(),
            "role \"cstest_nobody\" does not exist".into(),
        ),
        ("pg bad host", "postgres://postgres@no-such-host.invalid/test".into(), "no-such-host.invalid".into()),
        (
            "mysql wrong port",
            "mysql://root@127.0.0.1:1/test".into(),
            "Can't connect to MySQL server on '127.0.0.1:1'".into(),
        ),
        ("mysql missing database", format!("{my}/cstest_no_such_db"), "Unknown database 'cstest_no_such_db'".into()),
        (
            "mysql unknown user",
            "mysql://cstest_nobody:wrong@127.0.0.1:3306/test".into(),
            "Access denied for user 'cstest_nobody'".into(),
        ),
        ("mysql bad host", "mysql://root@no-such-host.invalid/test".into(), "no-such-host.invalid".into()),
        ("sqlite missing folder", sqlite, format!("the folder {} does not exist", missing_folder.display())),
    ];
    // Each waits out its one-second pool timeout: side by side, not one after another.
    let outputs: Vec<Output> = std::thread::scope(|scope| {
        let runs: Vec<_> = cases.iter().map(|(_, url, _)| scope.spawn(move || migrate(url))).collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    });
    for ((case, url, expected), output) in cases.iter().zip(outputs) {
        let text = stderr(&output);
        assert!(!output.status.success(), "{case}: {url} migrated");
        assert!(!text.contains("Invalid connection url for multiconnection"), "{case}: {text}");
        assert!(text.contains(expected.as_str()), "{case}: expected {expected:?} in:\n{text}");
        assert!(text.contains("COUNTERSINK_DATABASE_URL"), "{case}: the message names no setting:\n{text}");
        assert!(!text.contains(":wrong@"), "{case}: the password was printed:\n{text}");
    }
    assert!(!missing_folder.exists(), "the missing folder was created");
}

#[test]
fn a_postgres_url_never_creates_a_sqlite_file() {
    // diesel's derived MultiConnection tried SQLite after PostgreSQL failed, with the URL as a path.
    let dir = tempfile::tempdir().unwrap();
    let output = countersink()
        .current_dir(dir.path())
        .args(["--database-url", "postgres://postgres@127.0.0.1:1/test", "--db-timeout-secs", "1", "migrate"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "files appeared: {}", stderr(&output));
}

/// `.env.sample` as systemd's `EnvironmentFile=` reads it: `KEY=value`, double quotes removed.
fn env_sample() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".env.sample")).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not KEY=value: {line}"));
            let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
            (key.to_string(), value.to_string())
        })
        .collect()
}

/// Every setting's variable with its default ("" for none), from the CLI definition.
fn settings() -> BTreeMap<String, String> {
    fn walk(command: &clap::Command, into: &mut BTreeMap<String, String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                let default = arg.get_default_values().iter().map(|v| v.to_string_lossy()).collect::<Vec<_>>();
                let default = if arg.get_action().takes_values() { default.join(",") } else { "false".into() };
                into.insert(env.to_string_lossy().into_owned(), default);
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, into);
        }
    }
    let mut settings = BTreeMap::new();
    walk(&Cli::command(), &mut settings);
    // Read by the binary before the CLI, as a tracing filter.
    settings.insert("COUNTERSINK_LOG".into(), "info".into());
    settings
}

#[test]
fn env_sample_lists_every_setting_with_its_default() {
    let sample = env_sample();
    let settings = settings();
    let missing: Vec<_> = settings.keys().filter(|k| !sample.contains_key(*k)).collect();
    let unknown: Vec<_> = sample.keys().filter(|k| !settings.contains_key(*k)).collect();
    assert!(missing.is_empty() && unknown.is_empty(), "missing from .env.sample: {missing:?}; unknown: {unknown:?}");
    for (name, default) in &settings {
        assert_eq!(&sample[name], default, "{name}: .env.sample says {:?}, the default is {default:?}", sample[name]);
    }
}

#[test]
fn env_sample_is_read_alike_by_a_shell() {
    // `set -a; . ./.env.sample` broke on the unquoted cron line (`*: command not found`).
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join(".env.sample");
    let output =
        Command::new("bash").args(["-c", "set -a; . \"$0\"; set +a; env"]).arg(&sample).env_clear().output().unwrap();
    assert!(output.status.success() && output.stderr.is_empty(), "{}", stderr(&output));
    let shell: BTreeMap<String, String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| key.starts_with("COUNTERSINK_"))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    assert_eq!(shell, env_sample(), "a shell and systemd read .env.sample differently");
}

/// Waits until `GET {base}{path}` answers `status`.
fn answers(base: &str, path: &str, status: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if http_status(base, path) == Some(status) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A bare HTTP/1.1 GET: the status code, if the server answered.
fn http_status(base: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let address = base.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// SIGTERM, then the exit status (the graceful stop runs a final flush).
fn stop(child: &mut std::process::Child) -> std::process::ExitStatus {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("the service did not stop within 30 s of SIGTERM");
}

#[tokio::test]
async fn the_service_starts_on_env_sample_as_it_is() {
    let env = TestEnv::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join(".env.sample");
    let base = format!("http://127.0.0.1:{}", support::free_port());
    // Loaded by a shell as the README shows; the flags only keep this test on its own port, Redis
    // prefix and (in a scratch folder, the sample's relative SQLite path) database.
    let script = "set -a; . \"$0\"; set +a; exec \"$@\"";
    let mut child = clean("bash")
        .current_dir(dir.path())
        .args(["-c", script])
        .arg(&sample)
        .arg(BIN)
        .args(["serve", "--insecure-no-auth", "--listen", base.trim_start_matches("http://")])
        .args(["--redis-url", &env.core.redis_url, "--redis-prefix", &env.core.redis_prefix])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = answers(&base, "/readyz", 200, Duration::from_secs(20));
    let status = stop(&mut child);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut text).unwrap();
    assert!(ready, "not ready on .env.sample:\n{text}");
    assert!(status.success(), "{status}:\n{text}");
    assert!(dir.path().join("countersink.sqlite3").exists(), "the sample's database was not created");
}

/// `serve` on `env` with `log` as `COUNTERSINK_LOG` (unset when `None`), flushing every second.
fn serve(env: &TestEnv, log: Option<&str>, stdout: Stdio, stderr: Stdio) -> (std::process::Child, String) {
    let base = format!("http://127.0.0.1:{}", support::free_port());
    let mut command = countersink();
    command
        .args(["--redis-url", &env.core.redis_url, "--redis-prefix", &env.core.redis_prefix])
        .args(["--database-url", &env.core.database_url])
        .args(["serve", "--insecure-no-auth", "--flush-cron", "*/1 * * * * *"])
        .args(["--listen", base.trim_start_matches("http://")])
        .stdout(stdout)
        .stderr(stderr);
    if let Some(log) = log {
        command.env("COUNTERSINK_LOG", log);
    }
    let child = command.spawn().unwrap();
    assert!(answers(&base, "/healthz", 200, Duration::from_secs(20)), "the service did not answer");
    (child, base)
}

/// One unread notification for `user`, sent unsigned (the service runs with --insecure-no-auth).
fn send_event(base: &str, notification: u64, user: u64) -> Option<u16> {
    use std::io::{Read, Write};
    let address = base.strip_prefix("http://").unwrap();
    let body = format!(
        r#"{{"kind":"post_save","notification_id":{notification},"user_id":{user},"unread":true,"created":true}}"#
    );
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    write!(
        stream,
        "POST /v1/events HTTP/1.1\r\nHost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn an_idle_service_logs_nothing_after_start_up() {
    let env = TestEnv::sqlite().await;
    let (mut child, base) = serve(&env, None, Stdio::null(), Stdio::piped());
    let pipe = child.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    // Three scheduled flushes with nothing to write.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let idle = lines.lock().unwrap().clone();
    // Work is still reported at info: one flush that wrote one user.
    assert_eq!(send_event(&base, 1, 7), Some(200));
    let flushed = support::eventually(Duration::from_secs(5), || {
        lines.lock().unwrap().iter().any(|line| line.contains("flush done") && line.contains("users_written=1"))
    })
    .await;
    assert!(stop(&mut child).success());
    reader.join().unwrap();
    let all = lines.lock().unwrap().join("\n");
    assert!(idle.iter().any(|line| line.contains("listening")), "{all}");
    let noise: Vec<_> =
        idle.iter().filter(|line| line.contains("flush done") || line.contains("tokio_cron_scheduler")).collect();
    assert!(noise.is_empty(), "an idle service logged:\n{noise:#?}");
    assert!(flushed, "a flush that wrote something was not logged:\n{all}");
}

#[tokio::test]
async fn a_closed_stderr_and_stdout_do_not_stop_the_service() {
    let env = TestEnv::sqlite().await;
    // Like `countersink serve 2>&1 | head -1`: the reader goes away, every later write fails.
    let (mut child, base) = serve(&env, Some("debug"), Stdio::piped(), Stdio::piped());
    drop(child.stdout.take());
    drop(child.stderr.take());
    for notification in 0..3 {
        assert_eq!(send_event(&base, notification, 7), Some(200));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(child.try_wait().unwrap(), None, "the service exited once its logs had nowhere to go");
    assert_eq!(http_status(&base, "/healthz"), Some(200));
    let status = stop(&mut child);
    assert!(status.success(), "{status}");
}

#[test]
fn a_closed_stdout_does_not_fail_a_command() {
    // Like `countersink openapi | head -1`.
    let mut child = countersink().arg("openapi").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}: {}", output.status, stderr(&output));
}

#[test]
fn reconcile_usage_needs_a_user_or_all() {
    let help = countersink().args(["reconcile", "--help"]).output().unwrap();
    let usage = String::from_utf8_lossy(&help.stdout).lines().find(|l| l.starts_with("Usage:")).unwrap().to_string();
    assert!(usage.contains("<--user <USER_ID>|--all>"), "{usage}");
    assert!(!usage.contains("|--rate"), "--rate reads as an alternative to --user and --all: {usage}");
    let rate_alone = countersink().args(["reconcile", "--rate", "5"]).output().unwrap();
    assert_eq!(rate_alone.status.code(), Some(2), "{}", stderr(&rate_alone));
    assert!(stderr(&rate_alone).contains("--user <USER_ID>|--all"), "{}", stderr(&rate_alone));
}

/// The README's status table has a row for every status the OpenAPI document (generated from the
/// code) gives any route, and its *Outcomes* table a row for
/// every outcome `POST /v1/events` reports: a status or an outcome added to the code without its
/// explanation fails here.
#[test]
fn readme_explains_every_status_and_outcome() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    // The rows of the table whose header is `header`, each without its leading "| ".
    let rows_of = |header: &str| -> Vec<&str> {
        let table: Vec<&str> = readme
            .lines()
            .skip_while(|line| !line.starts_with(header))
            .take_while(|line| line.starts_with('|'))
            .collect();
        assert!(table.len() > 2, "README.md has no table headed {header:?}");
        table[2..].iter().filter_map(|line| line.strip_prefix("| ")).collect()
    };
    let status_rows = rows_of("| status | when | retry? |");
    let outcome_rows = rows_of("| outcome | what happened | example |");
    let openapi: serde_json::Value = serde_json::from_str(&countersink::http::openapi::document()).unwrap();
    let mut statuses = std::collections::BTreeSet::new();
    for (path, operations) in openapi["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            for status in operation["responses"].as_object().unwrap().keys() {
                statuses.insert((status.clone(), format!("{method} {path}")));
            }
        }
    }
    assert!(statuses.len() > 20, "read too few responses from the OpenAPI document: {statuses:?}");
    for (status, route) in &statuses {
        assert!(
            status_rows.iter().any(|row| row.starts_with(&format!("{status} "))),
            "README.md's status table has no row for {status} (answered by {route})"
        );
    }
    let outcomes = serde_json::to_value(countersink::store::ApplyOutcome::default()).unwrap();
    let outcomes = outcomes.as_object().unwrap();
    assert_eq!(outcomes.len(), 5, "{outcomes:?}");
    for outcome in outcomes.keys() {
        assert!(
            outcome_rows.iter().any(|row| row.starts_with(&format!("`{outcome}` |"))),
            "README.md's *Outcomes* table has no row for `{outcome}`"
        );
    }
}

/// The README's quick start: its `sh` blocks after `## Quick start`, up to the next section.
fn quick_start_blocks() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("\n## Quick start\n").nth(1).unwrap().split("\n## ").next().unwrap();
    section
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("\n```").next().unwrap().lines().map(str::to_string).collect())
        .collect()
}

/// A JSON answer with what differs from run to run (batch ids, durations) blanked out.
fn comparable(text: &str) -> serde_json::Value {
    fn blank(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(object) => {
                for (key, item) in object.iter_mut() {
                    if key == "batch_id" || key == "duration_ms" {
                        *item = serde_json::Value::Null;
                    } else {
                        blank(item);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(blank),
            _ => {}
        }
    }
    let mut value: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    blank(&mut value);
    value
}

#[tokio::test]
async fn readme_quick_start_answers_as_shown() {
    let env = TestEnv::sqlite().await;
    let blocks = quick_start_blocks();
    let serve_line = blocks[0].iter().find(|line| line.starts_with("countersink serve")).unwrap();
    assert!(blocks[0].iter().any(|line| line.starts_with("cargo install")), "the quick start installs no binary");
    // The shown outputs hold only if no scheduled flush runs between the commands.
    assert!(serve_line.contains("--flush-cron off"), "{serve_line}");
    let args: Vec<&str> = serve_line.split('#').next().unwrap().split_whitespace().collect();
    let args: Vec<&str> = args[1..].iter().copied().filter(|a| !a.starts_with("2>") && *a != "&").collect();

    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let mut child = countersink()
        .current_dir(dir.path())
        .env("COUNTERSINK_REDIS_PREFIX", &env.core.redis_prefix)
        .args(&args)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(answers(&format!("http://127.0.0.1:{port}"), "/healthz", 200, Duration::from_secs(20)));

    // Each command runs up to the `# {...}` line that shows its answer, with `countersink` the
    // binary under test, on this test's port and Redis prefix.
    let bin_dir = Path::new(BIN).parent().unwrap().display().to_string();
    let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
    let mut command = String::new();
    let mut checked = 0;
    for line in &blocks[1] {
        if let Some(expected) = line.strip_prefix("# ").filter(|rest| rest.starts_with('{')) {
            let script = command.replace("localhost:7878", &format!("127.0.0.1:{port}"));
            let output = clean("bash")
                .args(["-c", &script])
                .current_dir(dir.path())
                .env("PATH", &path)
                .env("COUNTERSINK_REDIS_PREFIX", &env.core.redis_prefix)
                .output()
                .unwrap();
            let answer = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success(), "{script}: {}", stderr(&output));
            let shown = expected.replace("\"9f…\"", "\"any\"");
            assert_eq!(comparable(&answer), comparable(&shown), "{script}");
            checked += 1;
            command.clear();
        } else if !line.starts_with('#') && !line.trim().is_empty() && !line.starts_with("kill ") {
            command.push_str(line.split("  #").next().unwrap());
            command.push('\n');
        }
    }
    assert_eq!(checked, 4, "the quick start shows four answers");
    assert!(stop(&mut child).success());
}

/// python_client/README.md's getting-started section, up to the badge.
fn django_getting_started() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("python_client/README.md")).unwrap();
    let start = readme.find("## From nothing to a badge").expect("the getting-started section");
    let end = readme[start..].find("5. **Show the badge:**").map_or(readme.len(), |i| start + i);
    readme[start..end].to_string()
}

#[test]
fn django_readme_gets_from_nothing_to_a_running_sidecar() {
    let text = django_getting_started();
    assert!(text.contains("cargo install --locked --path ."), "no step gets the sidecar binary");
    assert!(text.contains("redis-server") && text.contains("Redis"), "Redis is not said to be needed");
    assert!(!text.contains("env("), "the settings use an undefined env(...)");
    assert!(!text.contains("pip install countersink"), "offers a package that is not published");

    // The commands that make the secret and the token make ones the sidecar takes.
    let exports: Vec<&str> = text.lines().map(str::trim).filter(|l| l.starts_with("export COUNTERSINK_")).collect();
    assert_eq!(exports.len(), 2, "{exports:?}");
    let script = format!(
        "{}\nprintf '%s\\n%s\\n' \"$COUNTERSINK_WEBHOOK_SECRET\" \"$COUNTERSINK_ADMIN_TOKEN\"",
        exports.join("\n")
    );
    let output = clean("bash").args(["-c", &script]).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let made = String::from_utf8(output.stdout).unwrap();
    let (secret, token) = made.trim().split_once('\n').unwrap();
    secret.parse::<countersink::webhook::WebhookSecret>().unwrap_or_else(|e| panic!("{secret}: {e}"));
    assert!(token.len() >= 16 && !token.contains(char::is_whitespace), "{token}");

    // The sidecar command parses: every flag it names exists.
    let command = text.split("```sh").filter_map(|block| block.find("countersink --database-url").map(|i| &block[i..]));
    let command = command.map(|c| c.split("\n   curl").next().unwrap().replace("\\\n", " ")).next().unwrap();
    let args: Vec<&str> = command.split_whitespace().collect();
    Cli::try_parse_with(args, |_| None).unwrap_or_else(|e| panic!("{command}: {e}"));
}

/// The right-hand side of `NAME = ...` in a module of the Python client.
fn python_assignment(module: &str, name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("python_client/src/countersink").join(module);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim_start().strip_prefix('=').map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {name} = ... in {}", path.display()))
}

/// The value of `NAME = <integer>` (or `2**N - 1`) in a module of the Python client.
fn python_constant(module: &str, name: &str) -> u64 {
    let value = python_assignment(module, name);
    let value = value.as_str();
    match value.strip_prefix("2**").and_then(|rest| rest.strip_suffix(" - 1")) {
        Some(power) => (1u64 << power.parse::<u32>().unwrap()) - 1,
        None => value.replace('_', "").parse().unwrap_or_else(|_| panic!("{name} = {value}: not an integer")),
    }
}

/// A string constant `NAME = "..."` (or `b"..."`) of the Python client's `module`.
fn python_string(module: &str, name: &str) -> String {
    let value = python_assignment(module, name);
    let value = value.as_str();
    let quoted = value.strip_prefix('b').unwrap_or(value);
    quoted
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{name} = {value}: not a plain string"))
        .to_string()
}

/// Issue #19, limits copied across languages and places: `Limits::default()` (what in-process
/// code and tests assume) is what `countersink serve` parses with no flag set, and the Python
/// client's hard-coded limits are the sidecar's defaults (a client sending larger batches or
/// reads than the sidecar takes would have them refused).
#[test]
fn the_python_client_and_the_sidecar_agree_on_the_default_limits() {
    use countersink::app::Limits;
    use countersink::cli::Command as Subcommand;

    let cli = Cli::try_parse_with(["countersink", "serve"], |_| None).unwrap();
    let Subcommand::Serve(serve) = cli.command else { panic!("not serve: {:?}", cli.command) };
    let limits = Limits::from(&*serve);
    assert_eq!(limits, Limits::default(), "the clap defaults and Limits::default()");
    assert_eq!(python_constant("events.py", "MAX_EVENTS_PER_REQUEST"), limits.max_batch_events as u64);
    assert_eq!(python_constant("api.py", "MAX_USERS_PER_READ"), limits.max_read_users as u64);
    assert_eq!(python_constant("events.py", "MAX_ID"), countersink::events::MAX_ID);
    assert_eq!(python_constant("checks.py", "MAX_STREAM_TOKEN_TTL"), countersink::config::MAX_STREAM_TOKEN_SECS);
    // Labels and codes both sides define: the stream-token key's label, the secret's form, the
    // event kinds.
    assert_eq!(python_string("live.py", "KEY_LABEL"), countersink::live::token::KEY_LABEL);
    assert_eq!(python_string("signing.py", "SECRET_PREFIX"), countersink::webhook::SECRET_PREFIX);
    assert_eq!(python_constant("signing.py", "MIN_KEY_BYTES"), countersink::webhook::MIN_SECRET_BYTES as u64);
    assert_eq!(python_string("events.py", "POST_SAVE"), countersink::events::kind::POST_SAVE);
    assert_eq!(python_string("events.py", "POST_DELETE"), countersink::events::kind::POST_DELETE);
    assert_eq!(python_string("events.py", "RECOUNT"), countersink::events::kind::RECOUNT);
}
