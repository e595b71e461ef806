#!/usr/bin/env bash
# Runs every test: formatting and lints, the Rust tests against the real Redis, PostgreSQL and MariaDB,
# and the Django package's tests against the real sidecar binary.
# Installs what a fresh machine lacks and starts a local service that is down.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

say "system packages"
# No -dev package of a database client: libpq, libmysqlclient, SQLite and OpenSSL are compiled
# from source (Cargo.toml says why), which takes a C/C++ compiler, make, perl and cmake.
# debootstrap makes the root that scripts/nodev-build.sh builds in; the outage tests run a
# redis-server of their own.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v perl >/dev/null 2>&1 || missing+=(perl)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
[ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

say "services"
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "starting postgresql"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
mariadb_up() { mariadb-admin --protocol=tcp -h 127.0.0.1 -P 3306 -u root ping >/dev/null 2>&1; }
if ! mariadb_up; then
  echo "starting mariadb"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
fi
for _ in $(seq 1 100); do
  redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432 && mariadb_up && break
  sleep 0.2
done
redis-cli -h 127.0.0.1 ping >/dev/null || { echo "redis is not answering on 127.0.0.1:6379"; exit 1; }
pg_isready -h 127.0.0.1 -p 5432 || { echo "postgresql is not answering on 127.0.0.1:5432"; exit 1; }
mariadb_up || { echo "mariadb is not answering on 127.0.0.1:3306 (root, no password)"; exit 1; }
mariadb --protocol=tcp -h 127.0.0.1 -P 3306 -u root -e "CREATE DATABASE IF NOT EXISTS test"

say "a build without any client library's -dev package (scripts/nodev-build.sh)"
# Builds every target in a Debian root without them and migrates each backend with that binary;
# the lints and tests below reuse what it built.
scripts/nodev-build.sh

say "format and lints"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

say "rust tests"
cargo test --locked --all-targets

say "API contract (schemathesis against the running service)"
# target/debug/countersink is the binary cargo test just built; its crash points (the test-only
# `failpoints` feature, src/crash_point.rs) do nothing unless COUNTERSINK_CRASH_POINT is set, so
# it is used as it is instead of building the crate a second time without them.
scripts/schemathesis.sh 30

say "fuzzing (a short run of every cargo-fuzz target; docs/fuzzing.md has the long run)"
fuzz/run.sh 20

say "python client tests"
# The live-badge test drives headless Chromium (Debian's chromium and chromium-driver) through
# selenium; installing them takes about a minute on a fresh machine, the test about 4 s.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "installing: chromium chromium-driver"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# --matrix: then the suite on Django 4.2, 5.2, 6.0 and 6.1 and the django-notifications-hq suite
# (python_client/matrix.sh; about 10 minutes on 2 CPUs with its venvs reused between runs). STRICT:
# a cell whose Python is missing fails the run instead of being skipped.
COUNTERSINK_MATRIX_STRICT=1 COUNTERSINK_REQUIRE_BROWSER=1 COUNTERSINK_BIN="$PWD/target/debug/countersink" python_client/run-tests.sh --matrix
