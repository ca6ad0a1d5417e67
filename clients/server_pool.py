"""Several servers behind one client: send to the least-busy healthy one; a failing one rests.

A server that fails rests with an exponentially growing backoff; after repeated UNAVAILABLE
failures its gRPC channel is replaced by a fresh one (a channel that saw its server go away can
stay in TRANSIENT_FAILURE long after the server is back).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Sequence

from morphocam.clients.errors import status_of


class Endpoint:
    def __init__(self, url: str, client):
        self.url = url
        self.client = client
        self.in_flight = 0
        self.failures = 0
        self.down_until = 0.0
        self.last_error: str | None = None
        self.answered = 0
        self.reconnected = 0.0


class ServerPool:
    """Several servers: send to the least-busy healthy one; a failing one rests with a growing backoff."""

    def __init__(self, urls: Sequence[str], client_factory: Callable[[str], object],
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 2.0):
        self.endpoints = [Endpoint(u, client_factory(u)) for u in urls]
        self._factory = client_factory
        self._retired: list = []  # replaced clients, closed at the end (never from a gRPC callback)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._lock = threading.Lock()
        self._rr = itertools.count()

    def pick(self) -> Endpoint | None:
        now = time.monotonic()
        with self._lock:
            healthy = [e for e in self.endpoints if e.down_until <= now]
            if not healthy:
                return None
            start = next(self._rr)
            order = healthy[start % len(healthy):] + healthy[:start % len(healthy)]
            ep = min(order, key=lambda e: e.in_flight)
            ep.in_flight += 1
            return ep

    def release(self, ep: Endpoint) -> None:
        with self._lock:
            ep.in_flight -= 1

    def mark_ok(self, ep: Endpoint) -> None:
        with self._lock:
            ep.failures = 0
            ep.down_until = 0.0
            ep.answered += 1

    def mark_down(self, ep: Endpoint, error: BaseException) -> None:
        with self._lock:
            ep.failures += 1
            rest = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (ep.failures - 1))
            ep.down_until = max(ep.down_until, time.monotonic() + rest)
            ep.last_error = f"{status_of(error) or type(error).__name__}: {str(error)[:200]}"
            # A gRPC channel that saw its server go away can stay in TRANSIENT_FAILURE long after the
            # server is back; after repeated failures open a fresh channel to the same URL.
            if ep.failures >= 2 and status_of(error) in ("UNAVAILABLE", "") and \
                    time.monotonic() - ep.reconnected >= self.backoff_max_s:
                try:
                    fresh = self._factory(ep.url)
                except Exception:  # noqa: BLE001 - keep the old client; the next failure tries again
                    return
                self._retired.append(ep.client)
                ep.client = fresh
                ep.reconnected = time.monotonic()

    def wait_time(self) -> float:
        now = time.monotonic()
        with self._lock:
            return max(0.0, min(e.down_until for e in self.endpoints) - now)

    def close(self) -> None:
        for client in [ep.client for ep in self.endpoints] + self._retired:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a dead channel must not hide the real result
                pass
