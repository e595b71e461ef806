"""TEST_MODE: a host project's test suite runs without a sidecar (the README's example)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_a_host_projects_tests_pass_in_test_mode_without_a_sidecar() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUNTERSINK_") and k != "PYTEST_XDIST_WORKER"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "--ds",
            "hostproject.settings",
            str(HERE / "hostproject" / "example_tests.py"),
        ],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
