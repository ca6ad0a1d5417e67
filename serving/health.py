"""Ask a running Triton server how it is, over its HTTP (KServe v2) endpoints, with the standard library.

Used by :class:`morphocam.serving.launcher.TritonServer` to wait for readiness, and usable on its own
by anything that watches a server it did not start (a supervisor, a health check). Every call
answers within ``timeout`` seconds and never raises for a server that is down: status 0 means
"no answer".
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request


class HealthProbe:
    """Liveness, readiness and the model index of the server at ``http_url`` (``host:port``)."""

    def __init__(self, http_url: str, timeout: float = 2.0):
        self.http_url = http_url
        self.timeout = timeout

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        """(HTTP status, body); (0, b"") when nothing answers."""
        req = urllib.request.Request(f"http://{self.http_url}{path}", method=method,
                                     data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
            return 0, b""

    def is_live(self) -> bool:
        return self.request("GET", "/v2/health/live")[0] == 200

    def is_ready(self) -> bool:
        """Server ready; with ``--strict-readiness`` (the launcher's setting) that means every model is."""
        return self.request("GET", "/v2/health/ready")[0] == 200

    def models(self) -> list[dict]:
        """The repository index: ``[{"name", "version", "state", "reason"}, ...]``; empty without an answer."""
        status, body = self.request("POST", "/v2/repository/index")
        return json.loads(body) if status == 200 else []
