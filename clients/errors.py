"""Which failures a retry can cure, and the record a frame gets when it cannot be classified.

A transient failure (server restarting, overloaded, slow, model reloading) is retried with backoff,
on another server when one is healthy; any other failure becomes that frame's error record.
"""

from __future__ import annotations

# gRPC status codes a retry can cure: the server is restarting, overloaded or slow.
TRANSIENT_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED")
# Messages that mean the model is (re)loading: transient once we have seen the model served.
TRANSIENT_MESSAGES = ("not ready", "unknown model", "is not found", "failed to connect", "connection refused",
                      "socket closed", "stub process", "unavailable", "deadline exceeded", "shutting down")


class ServerUnavailable(RuntimeError):
    """No server answered within the retry deadline; the results so far have been yielded."""


def status_of(error: BaseException) -> str:
    status = getattr(error, "status", None)
    text = status() if callable(status) else status
    if not text:
        code = getattr(error, "code", None)
        text = str(code()) if callable(code) else ""
    return str(text or "").replace("StatusCode.", "")


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError, OSError)):
        return True
    status = status_of(error)
    if status in TRANSIENT_STATUSES:
        return True
    message = str(error).lower()
    return any(m in message for m in TRANSIENT_MESSAGES)


def error_record(frame_id: str, reason: str, model: str = "") -> dict:
    return {"frame_id": frame_id, "status": "error", "error": reason, "model": model}
