#!/usr/bin/env bash
# Runs the Django package's tests against the real sidecar, PostgreSQL and Redis.
#
#   python_client/run-tests.sh [pytest arguments...]     e.g. -n 2, -k signals, -x
#   python_client/run-tests.sh --matrix [pytest arguments...]
#       the same, then matrix.sh: the suite on Django 4.2, 5.2, 6.0 and 6.1 with the Python
#       versions each supports, and the django-notifications-hq suite (scripts/test.sh runs this)
#
# Creates python_client/.venv (gitignored) if needed, installs the package with its test
# extras, and runs pytest. Needs only Python >= 3.10 with pip; the rest comes from PyPI.
# Environment:
#   COUNTERSINK_BIN   the sidecar binary (default: ../target/debug/countersink; build it with `cargo build`)
#   PYTHON            the interpreter for the venv (default: python3.11, else python3)
#   PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE   the database (default 127.0.0.1:5432, postgres, test)
#   COUNTERSINK_TEST_REDIS_URL                  Redis (default redis://127.0.0.1:6379)
set -euo pipefail
cd "$(dirname "$0")"

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if command -v python3.11 >/dev/null 2>&1; then python=python3.11; else python=python3; fi
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "run-tests.sh: $python is $("$python" -V 2>&1); Python 3.10 or newer is needed" >&2
  exit 1
}

venv=.venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$venv"
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian without python3-venv has no ensurepip: make the venv bare and let the
    # interpreter's own pip install into it.
    rm -rf "$venv"
    "$python" -m venv --without-pip "$venv"
  fi
fi

if "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  pip=("$venv/bin/python" -m pip)
else
  pip=("$python" -m pip --python "$venv/bin/python")
fi
"${pip[@]}" install --quiet --disable-pip-version-check --upgrade pip
"${pip[@]}" install --quiet --disable-pip-version-check -e '.[test]'

if [ -n "${COUNTERSINK_BIN:-}" ]; then
  export COUNTERSINK_BIN
fi
if [ "${1:-}" = --matrix ]; then
  shift
  "$venv/bin/python" -m pytest "$@"
  exec ./matrix.sh "$@"
fi
exec "$venv/bin/python" -m pytest "$@"
