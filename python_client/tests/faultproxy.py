"""A TCP proxy in front of the real sidecar that can misbehave on purpose.

Modes:

- ``PASS``: forward both ways.
- ``LOSE_RESPONSES``: forward the request, let the sidecar apply it, then cut the client's
  connection instead of forwarding the answer (the client cannot know it was applied).
- ``HANG``: accept and read, never answer (the client times out).
- ``REFUSE``: close each connection at once.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from enum import Enum


class Mode(Enum):
    PASS = "pass"
    LOSE_RESPONSES = "lose_responses"
    HANG = "hang"
    REFUSE = "refuse"


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = Mode.PASS
        self.lost_responses = 0
        #: Connections accepted so far (keep-alive tests count them).
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                _close(s)

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.append(s)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            self.accepted += 1
            mode = self.mode
            if mode is Mode.REFUSE:
                _close(client)
            elif mode is Mode.HANG:
                threading.Thread(target=_drain, args=(client,), daemon=True).start()
            else:
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                except OSError:
                    _close(client)
                    continue
                upstream.settimeout(None)
                self._track(upstream)
                threading.Thread(target=_pump, args=(client, upstream, None), daemon=True).start()
                threading.Thread(target=_pump, args=(upstream, client, self), daemon=True).start()


def _pump(source: socket.socket, target: socket.socket, proxy: FaultProxy | None) -> None:
    """Copies ``source`` to ``target``; for answers (``proxy`` set) the mode may cut instead."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if proxy is not None and proxy.mode is Mode.LOSE_RESPONSES:
                proxy.lost_responses += 1
                # RST rather than FIN: the client sees the connection die mid-request.
                target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(target)


def _drain(client: socket.socket) -> None:
    try:
        while client.recv(65536):
            pass
    except OSError:
        pass


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.close()
