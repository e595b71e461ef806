"""The package builds and installs from a checkout it cannot write to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PYTHON_CLIENT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the checkout")
def test_building_writes_nothing_into_the_source_tree(tmp_path: Path) -> None:
    # A clean copy of the checkout (what git tracks), made read-only. Root ignores file modes,
    # so the check that counts is that not one file appears or changes.
    tracked = subprocess.run(
        ["git", "ls-files", "pyproject.toml", "README.md", "src"],
        cwd=PYTHON_CLIENT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    source = tmp_path / "checkout"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PYTHON_CLIENT / name, source / name)
    for path in [source, *source.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot(source)
    out = tmp_path / "wheels"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert snapshot(source) == before, "the build wrote into the checkout"
    (wheel,) = out.glob("countersink-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for packaged in (
        "countersink/py.typed",
        "countersink/templates/countersink/unread_badge.html",
        "countersink/static/countersink/live.js",
        "countersink/migrations/0001_initial.py",
    ):
        assert packaged in names
    assert not any("__pycache__" in n for n in names)
    for path in [source, *source.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
