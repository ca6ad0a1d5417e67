"""Ports for the server: pick free ones, and tell "someone listens here" from "recently closed".

Triton binds its gRPC, HTTP and metrics listeners with ``SO_REUSEADDR`` (gRPC's core and evhtp
both set it), so a port whose old connections linger in TIME-WAIT after a server stopped is
perfectly usable by the next server. :func:`port_is_free` binds the same way: only a socket that
is actually bound or listening on the port makes it busy. (``SO_REUSEPORT`` is deliberately not
set: with it, a bind would succeed *beside* a live gRPC listener, which sets that option too.)
"""

from __future__ import annotations

import errno
import socket

# Addresses that keep the server on this machine; anything else gets a warning from morphocam-serve.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just told us is free (racy by nature, fine for tests)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True when the server could bind ``host:port`` now, i.e. no live socket holds it.

    Binds with ``SO_REUSEADDR`` like the server does, so TIME-WAIT leftovers of a stopped server
    do not count as "in use".
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def client_host(host: str) -> str:
    """The address a client on this machine dials for a server bound to ``host`` (wildcards -> loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
