#!/usr/bin/env bash
# The version matrix: the package's suite on each Django / Python pair below, each in a venv of
# its own (python_client/.venv-matrix/, gitignored, reused between runs), against the real
# sidecar, PostgreSQL and Redis like run-tests.sh. The Django 4.2 cells also run tests_hq/, the
# django-notifications-hq suite: django-notifications-hq 1.8.3 (its latest release) declares
# Meta.index_together, which Django 5.1 removed, so it cannot be imported on 5.1 and later.
#
#   python_client/matrix.sh [pytest arguments...]        (run-tests.sh --matrix calls it)
#
# Interpreters: pythonX.Y on PATH, else pyenv's (~/.pyenv/versions/X.Y.*). A cell whose Python
# is missing is reported as SKIPPED (the run still fails if any cell that ran failed);
# COUNTERSINK_MATRIX_STRICT=1 makes a missing Python a failure too (scripts/test.sh sets it).
# The default run (run-tests.sh: Python 3.11 with the newest Django it gets, 5.2) is not repeated.
# COUNTERSINK_MATRIX_FULL=1 adds the cells that give every Django each Python from 3.10 to 3.13 it
# supports (10 cells in all: 7 min 48 s on 2 CPUs in its last run, so not in CI; README.md has it).
set -uo pipefail
cd "$(dirname "$0")"

# python  Django pin      suites
cells=(
  "3.10   >=4.2,<4.3  tests tests_hq"
  "3.13   >=5.2,<5.3  tests"
  "3.12   >=6.0,<6.1  tests"
  "3.13   >=6.1,<6.2  tests"
)
if [ "${COUNTERSINK_MATRIX_FULL:-0}" = 1 ]; then
  cells+=(
    "3.11   >=4.2,<4.3  tests tests_hq"
    "3.12   >=4.2,<4.3  tests tests_hq"
    "3.10   >=5.2,<5.3  tests"
    "3.12   >=5.2,<5.3  tests"
    "3.13   >=6.0,<6.1  tests"
    "3.12   >=6.1,<6.2  tests"
  )
fi

find_python() {
  # The first candidate that runs: pyenv's shims on PATH exist for every version but work only
  # for the selected ones.
  local version=$1 candidate
  for candidate in "$(command -v "python$version" 2>/dev/null)" \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import sys' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

failed=() skipped=() passed=()
for cell in "${cells[@]}"; do
  read -r version pin suites <<<"$cell"
  name="py$version-django$pin"
  python=$(find_python "$version") || { echo "matrix: $name SKIPPED (no python$version here)"; skipped+=("$name"); continue; }
  django=${pin#>=}; django=${django%%,*}
  venv=".venv-matrix/py$version-dj$django"
  echo "== matrix: $name ($python, $venv)"
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" || { failed+=("$name (venv)"); continue; }
  fi
  extras=test
  [[ " $suites " == *" tests_hq "* ]] && extras=test-hq
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "Django$pin" -e ".[$extras]"; then
    failed+=("$name (install)"); continue
  fi
  "$venv/bin/python" -c 'import django, sys; print(f"   Python {sys.version.split()[0]}, Django {django.get_version()}")'
  ok=1
  for suite in $suites; do
    settings_args=()
    [ "$suite" = tests_hq ] && settings_args=(--ds hqproject.settings)
    # The browser test and the wheel build run in the default run only: they do not depend on
    # the Django version, and the build alone takes 20 to 35 s.
    if ! env -u COUNTERSINK_REQUIRE_BROWSER "$venv/bin/python" -m pytest -q -p no:cacheprovider \
      "${settings_args[@]}" "$suite" -k "not changes_the_badge_on_the_page and not writes_nothing_into" "$@"; then
      ok=0
    fi
  done
  if [ $ok = 1 ]; then passed+=("$name"); else failed+=("$name"); fi
done

echo "== matrix: ${#passed[@]} passed: ${passed[*]:-}"
[ ${#skipped[@]} -gt 0 ] && echo "== matrix: ${#skipped[@]} SKIPPED: ${skipped[*]}"
[ ${#failed[@]} -gt 0 ] && { echo "== matrix: ${#failed[@]} FAILED: ${failed[*]}"; exit 1; }
[ ${#skipped[@]} -gt 0 ] && [ "${COUNTERSINK_MATRIX_STRICT:-0}" = 1 ] && exit 1
exit 0
