"""Why a server did not start: the exceptions :mod:`morphocam.serving.launcher` raises to its callers."""


class ServerStartError(RuntimeError):
    """The server did not become ready; the message carries the reason and the log tail."""


class PortInUseError(ServerStartError):
    """A requested port is already bound by another process."""
