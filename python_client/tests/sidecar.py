"""Runs the real countersink binary for tests and benchmarks.

The flags the sidecar is started with are in :data:`FEATURE_FLAGS`; a flag is passed only if
the binary's ``--help`` lists it, so flags that are still being built are picked up as soon
as they land (each at the position, global or ``serve``, where ``--help`` shows it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

PYTHON_CLIENT = Path(__file__).resolve().parents[1]
DEFAULT_BINARY = PYTHON_CLIENT.parent / "target" / "debug" / "countersink"

#: How long the binary may take to answer /healthz after it starts.
START_TIMEOUT = 20.0


def binary_path() -> Path:
    """``$COUNTERSINK_BIN``, relative to python_client/ if relative; else ../target/debug/countersink."""
    configured = os.environ.get("COUNTERSINK_BIN")
    if not configured:
        return DEFAULT_BINARY
    path = Path(configured)
    return path if path.is_absolute() else (PYTHON_CLIENT / path).resolve()


def feature_flags(secret: str, admin_token: str, read_token: str) -> dict[str, str]:
    """Flags of features being built: signing, tokens, the notification-table mapping."""
    return {
        "--webhook-secret": secret,
        "--admin-token": admin_token,
        "--read-token": read_token,
        "--source-table": "notifications_notification",
        "--source-id-column": "id",
        "--source-user-column": "recipient_id",
        "--source-unread-column": "unread",
        "--source-unread-when": "true",
        "--source-deleted-column": "deleted",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Sidecar:
    """One sidecar process; :meth:`stop` and :meth:`start` again keep its port."""

    def __init__(
        self,
        binary: Path,
        *,
        database_url: str,
        redis_url: str,
        redis_prefix: str,
        log_path: Path,
        wanted_flags: dict[str, str],
    ) -> None:
        self.binary = binary
        self.database_url = database_url
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix
        self.log_path = log_path
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        global_help = self._help()
        serve_help = self._help("serve")
        self.global_flags = {f: v for f, v in wanted_flags.items() if _lists(global_help, f)}
        self.serve_flags = {
            f: v for f, v in wanted_flags.items() if _lists(serve_help, f) and f not in self.global_flags
        }
        self.missing_flags = sorted(set(wanted_flags) - set(self.global_flags) - set(self.serve_flags))

    def _help(self, *subcommand: str) -> str:
        done = subprocess.run(
            [str(self.binary), *subcommand, "--help"], capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout

    def supports(self, flag: str) -> bool:
        """Whether the binary accepts ``flag`` (a feature that has landed)."""
        return flag in self.global_flags or flag in self.serve_flags

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            str(self.binary),
            "--redis-url",
            self.redis_url,
            "--redis-prefix",
            self.redis_prefix,
            "--database-url",
            self.database_url,
            "--db-pool-size",
            "4",
        ]
        for flag, value in self.global_flags.items():
            cmd += [flag, value]
        cmd += ["serve", "--listen", f"127.0.0.1:{self.port}", "--flush-cron", "off", "--migrate-on-start", "true"]
        for flag, value in self.serve_flags.items():
            cmd += [flag, value]
        return cmd

    def start(self) -> None:
        """Starts the binary and waits until /healthz answers."""
        if self.process is not None and self.process.poll() is None:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("COUNTERSINK_")}
        env["COUNTERSINK_LOG"] = env.get("COUNTERSINK_TEST_SIDECAR_LOG", "info")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the sidecar exited with {self.process.returncode} at start-up:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the sidecar did not answer /healthz within {START_TIMEOUT}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=0.5) as response:
                return bool(json.load(response).get("status") == "ok")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, crash: bool = False) -> None:
        """Stops the process: SIGTERM (its graceful shutdown flushes what is pending), then
        SIGKILL after 10 s; or SIGKILL at once with ``crash``, leaving pending deltas in Redis."""
        if self.process is not None:
            if self.process.poll() is None:
                if crash:
                    self.process.kill()
                else:
                    self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def delete_redis_keys(self) -> int:
        """Deletes every key under this sidecar's prefix."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{{{self.redis_prefix}}}:*", count=1000))
            return int(client.delete(*keys)) if keys else 0
        finally:
            client.close()


def missing_flags(binary: Path, flags: dict[str, str]) -> list[str]:
    """The flags of ``flags`` that neither ``--help`` nor ``serve --help`` lists."""
    texts = [
        subprocess.run([str(binary), *sub, "--help"], capture_output=True, text=True, timeout=30).stdout
        for sub in ((), ("serve",))
    ]
    return sorted(f for f in flags if not any(_lists(text, f) for text in texts))


def _lists(help_text: str, flag: str) -> bool:
    return re.search(rf"(^|\s){re.escape(flag)}([\s=<,]|$)", help_text, re.MULTILINE) is not None
