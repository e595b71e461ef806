"""HTTP/1.1 to the sidecar over keep-alive connections: one open connection per thread and host.

The standard library's :mod:`http.client` is enough: the sender thread keeps one connection
open for all its batches, and each request thread keeps its own for reads. A connection the
server closed while idle is noticed on the next request, which is then sent once more on a
fresh connection. Connections are dropped in a forked child, which must not share the
parent's sockets.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from countersink.errors import SidecarRejected, SidecarUnavailable

#: Statuses after which the same request may succeed later.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    http.client.CannotSendRequest,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)


@dataclass(frozen=True)
class Response:
    """A complete response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; ``None`` when it is empty or not JSON."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def retry_after(self) -> float | None:
        """``Retry-After`` in seconds, when given as a number."""
        value = self.headers.get("retry-after")
        try:
            return max(0.0, float(value)) if value is not None else None
        except ValueError:
            return None


def raise_for_status(response: Response, what: str) -> Any:
    """The JSON body of a 2xx answer; otherwise the matching error."""
    if 200 <= response.status < 300:
        return response.json()
    payload = response.json()
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code") or "http_error")
    message = str(error.get("message") or response.body[:200].decode("utf-8", "replace"))
    if response.status in RETRYABLE_STATUSES:
        raise SidecarUnavailable(
            f"{what}: the sidecar answered {response.status} {code}: {message}",
            status=response.status,
            retry_after=response.retry_after(),
        )
    field = error.get("field")
    raise SidecarRejected(response.status, code, message, str(field) if field else None)


class Transport:
    """Sends requests to the sidecar; safe to share between threads."""

    def __init__(self) -> None:
        self._local = threading.local()
        os.register_at_fork(after_in_child=self._forget_connections)

    def _forget_connections(self) -> None:
        # The child must not use (or close) the parent's sockets: just drop the objects.
        self._local = threading.local()

    def _connections(self) -> dict[tuple[str, str, int], http.client.HTTPConnection]:
        connections: dict[tuple[str, str, int], http.client.HTTPConnection] | None = getattr(
            self._local, "connections", None
        )
        if connections is None:
            connections = {}
            self._local.connections = connections
        return connections

    def close(self) -> None:
        """Closes this thread's connections."""
        for connection in self._connections().values():
            connection.close()
        self._connections().clear()

    def request(
        self,
        method: str,
        base_url: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        connect_timeout: float,
        timeout: float,
    ) -> Response:
        """Sends one request and reads the whole answer.

        Raises :class:`SidecarUnavailable` when the sidecar cannot be reached or does not
        answer in time; any HTTP answer, error statuses included, is returned.
        """
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SidecarUnavailable(f"SIDECAR_URL {base_url!r} is not an http(s):// URL")
        default_port = 443 if url.scheme == "https" else 80
        key = (url.scheme, url.hostname, url.port or default_port)
        target = url.path.rstrip("/") + path
        all_headers = {"Accept": "application/json", "User-Agent": "countersink-python"}
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        connections = self._connections()
        for attempt in (1, 2):
            connection = connections.get(key)
            reused = connection is not None and connection.sock is not None
            if connection is None:
                connection = _new_connection(key, connect_timeout)
                connections[key] = connection
            try:
                if connection.sock is None:
                    connection.timeout = connect_timeout
                    connection.connect()
                if connection.sock is not None:
                    connection.sock.settimeout(timeout)
                connection.request(method, target, body=body, headers=all_headers)
                raw = connection.getresponse()
                data = raw.read()
                if raw.will_close:
                    connection.close()
                return Response(
                    status=raw.status,
                    headers={k.lower(): v for k, v in raw.getheaders()},
                    body=data,
                )
            except _STALE_CONNECTION_ERRORS as e:
                connection.close()
                if reused and attempt == 1:
                    # The server closed the idle keep-alive connection: send again on a new one.
                    continue
                raise SidecarUnavailable(f"{method} {path}: connection to {base_url} lost ({e})") from e
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                raise SidecarUnavailable(f"{method} {path}: cannot reach {base_url} ({e!r})") from e
        raise AssertionError("unreachable")  # pragma: no cover


class _OneWrite:
    """Sends the request line, headers and a bytes body in one write.

    http.client writes the headers and the body separately: two wake-ups of the server per
    request, which costs a loopback sidecar (and the CPU it shares with the app) measurably.
    """

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        buffer: list[bytes] = self._buffer  # type: ignore[attr-defined]
        if isinstance(message_body, bytes) and not encode_chunked:
            buffer.extend((b"", b""))
            message = b"\r\n".join(buffer) + message_body
            del buffer[:]
            self.send(message)  # type: ignore[attr-defined]
            return
        super()._send_output(message_body, encode_chunked)  # type: ignore[misc]


class _HTTPConnection(_OneWrite, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_OneWrite, http.client.HTTPSConnection):
    pass


def _new_connection(key: tuple[str, str, int], connect_timeout: float) -> http.client.HTTPConnection:
    scheme, host, port = key
    if scheme == "https":
        return _HTTPSConnection(host, port, timeout=connect_timeout)
    return _HTTPConnection(host, port, timeout=connect_timeout)


#: The process-wide transport.
transport = Transport()
