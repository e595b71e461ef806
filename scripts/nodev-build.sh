#!/usr/bin/env bash
# Builds countersink, every test target included, inside a minimal Debian root that has a C/C++
# compiler, make, perl and cmake but no development package of any database client or of
# OpenSSL (no libpq-dev, libmariadb-dev, libmysqlclient-dev, libsqlite3-dev, libssl-dev), then
# runs the binary there against SQLite, PostgreSQL and MariaDB. It proves that a build needs no
# system -dev package for any backend, and that the binary needs no client library at run time.
#
# scripts/test.sh runs it first: the tests that follow use what it built (same toolchain, same
# paths, so cargo reuses the artifacts instead of building them again).
#
# The root is made once with debootstrap from this machine's own Debian sources and kept in
# $COUNTERSINK_NODEV_ROOT (default /var/cache/countersink/nodev-root); a stamp file records the
# suite and package list, and a root whose stamp differs is made anew. The project, cargo's home
# and rustup's toolchains are bind-mounted at their own paths, in a mount namespace of the
# script's own (unshare), so nothing stays mounted after it.
set -euo pipefail
cd "$(dirname "$0")/.."
project=$PWD

root=${COUNTERSINK_NODEV_ROOT:-/var/cache/countersink/nodev-root}
# libc6-dev is the C library's own headers (any C compiler needs them), not a client library.
packages=gcc,g++,make,perl,cmake,libc6-dev
# What must not be in the root: the packages, and their headers and link-time libraries.
forbidden_packages=(libpq-dev libmariadb-dev libmariadb-dev-compat default-libmysqlclient-dev libmysqlclient-dev
  libsqlite3-dev libssl-dev pkg-config pkgconf)
forbidden_files=(usr/include/postgresql usr/include/libpq-fe.h usr/include/mariadb usr/include/mysql
  usr/include/sqlite3.h usr/include/openssl)
forbidden_libraries='^lib(pq|mariadb|mysqlclient|sqlite3|ssl|crypto)\.so$'
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
cargo_home=${CARGO_HOME:-$HOME/.cargo}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}

say() { printf '\n== %s\n' "$*"; }

# The first Debian mirror this machine's apt uses (deb822 sources or a one-line sources.list).
mirror() {
  local uri
  uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v -- '-security' | head -n 1 || true)
  if [ -z "$uri" ]; then
    uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n 1 || true)
  fi
  [ -n "$uri" ] || { echo "no Debian mirror found in /etc/apt/sources.list*" >&2; exit 1; }
  echo "$uri"
}

stamp="$suite $packages"
if [ "$(cat "$root/.countersink-stamp" 2>/dev/null)" != "$stamp" ]; then
  say "making a Debian $suite root without -dev packages in $root"
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  started=$SECONDS
  # A debootstrap that was killed leaves the root's /proc (and what else it mounted) mounted.
  awk -v root="$root/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r umount -l
  mkdir -p "$(dirname "$root")"
  # Three tries: a mirror that drops a download now and then fails one ("Couldn't download packages").
  for try in 1 2 3; do
    rm -rf "$root"
    debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$(mirror)" >"$root.log" 2>&1 && break
    awk -v root="$root/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r umount -l
    [ "$try" -lt 3 ] || { tail -n 30 "$root.log"; exit 1; }
    echo "debootstrap failed (try $try of 3); trying again"
    sleep 5
  done
  echo "$stamp" >"$root/.countersink-stamp"
  echo "made in $((SECONDS - started)) s"
fi

say "the root has no client-library development files"
for package in "${forbidden_packages[@]}"; do
  if chroot "$root" dpkg -s "$package" >/dev/null 2>&1; then
    echo "the build root has $package installed"; exit 1
  fi
done
for file in "${forbidden_files[@]}"; do
  [ ! -e "$root/$file" ] || { echo "the build root has /$file"; exit 1; }
done
found=$(find "$root/usr/lib" "$root/lib" -name '*.so' -printf '%f\n' 2>/dev/null | grep -E "$forbidden_libraries" || true)
[ -z "$found" ] || { echo "the build root has link-time libraries: $found"; exit 1; }
echo "none of: ${forbidden_packages[*]}"

[ -z "${NODEV_ROOT_ONLY:-}" ] || exit 0

# Fresh databases for the binary to migrate, on the servers the tests use.
name=cstest_nodev_$$
pg_url=${COUNTERSINK_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
mysql_server=${COUNTERSINK_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/test}
mysql_server=${mysql_server%/*}
psql -q "$pg_url" -c "CREATE DATABASE $name" >/dev/null
mariadb --protocol=tcp -h 127.0.0.1 -P 3306 -u root -e "CREATE DATABASE $name CHARACTER SET utf8mb4"
cleanup() {
  psql -q "$pg_url" -c "DROP DATABASE IF EXISTS $name" >/dev/null 2>&1 || true
  mariadb --protocol=tcp -h 127.0.0.1 -P 3306 -u root -e "DROP DATABASE IF EXISTS $name" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# What runs inside the root, in the project.
inside=$(cat <<'INSIDE'
cargo build --locked --offline --all-targets
bin=target/debug/countersink
# No client library is loaded at run time: everything is linked in.
if ldd "$bin" | grep -E 'lib(pq|mariadb|mysqlclient|sqlite3|ssl|crypto)\.so'; then
  echo "the binary loads a client library at run time"; exit 1
fi
for url in sqlite:///tmp/nodev.sqlite3 "$NODEV_PG_URL" "$NODEV_MYSQL_URL"; do
  printf '%s: ' "${url%%://*}"
  COUNTERSINK_LOG=warn "$bin" --database-url "$url" migrate
done
INSIDE
)

say "build inside the root (cargo build --locked --all-targets), then migrate each backend with its binary"
started=$SECONDS
# Crates are fetched outside (the root has no certificates); inside, cargo works offline.
cargo fetch --locked >/dev/null
export NODEV_ROOT=$root NODEV_PROJECT=$project NODEV_CARGO_HOME=$cargo_home NODEV_RUSTUP_HOME=$rustup_home
export NODEV_PG_URL="${pg_url%/*}/$name" NODEV_MYSQL_URL="$mysql_server/$name" NODEV_INSIDE=$inside
unshare --mount --propagation private bash -euo pipefail -c '
  # /tmp first: the project may live under /tmp, and its bind mount must land on top.
  mount -t tmpfs tmpfs "$NODEV_ROOT/tmp"
  mount -t proc proc "$NODEV_ROOT/proc"
  mount --rbind /dev "$NODEV_ROOT/dev"
  for dir in "$NODEV_PROJECT" "$NODEV_CARGO_HOME" "$NODEV_RUSTUP_HOME"; do
    mkdir -p "$NODEV_ROOT$dir"
    mount --bind "$dir" "$NODEV_ROOT$dir"
  done
  cd "$NODEV_ROOT"
  exec chroot "$NODEV_ROOT" env PATH="$NODEV_CARGO_HOME/bin:/usr/local/bin:/usr/bin:/bin" \
    CARGO_HOME="$NODEV_CARGO_HOME" RUSTUP_HOME="$NODEV_RUSTUP_HOME" \
    bash -euo pipefail -c "cd \"\$NODEV_PROJECT\"; $NODEV_INSIDE"
'
echo "built and migrated in $((SECONDS - started)) s"
