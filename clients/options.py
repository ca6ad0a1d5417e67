"""What one streaming run is asked to do: servers, model, batching, concurrency, deadlines, TLS.

These are the library's options (:func:`morphocam.clients.streaming.classify_frames` takes them as
keyword arguments); ``morphocam-classify`` extends them with its input/output flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from morphocam.config import option

DEFAULT_URL = "127.0.0.1:8001"


@dataclass
class ConnectionOptions:
    """Which servers, and how to reach them: shared by the classify and explain commands."""

    urls: tuple[str, ...] = option("Triton gRPC endpoint HOST:PORT; repeat (or comma-separate) for several servers",
                                   (DEFAULT_URL,), flag="--url", repeat=True, metavar="HOST:PORT")
    ssl: bool = option("TLS to the server", False, switch=True)
    root_certificates: Optional[str] = option("PEM file of CA certificates for --ssl", None)

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            self.urls = (self.urls,)
        self.urls = tuple(self.urls)
        if not self.urls:
            raise ValueError("give at least one --url")

    def check_certificates(self) -> None:
        """For the command line: a CA file only makes sense with TLS, and must exist."""
        if self.root_certificates and not self.ssl:
            raise ValueError("--root-certificates needs --ssl")
        if self.root_certificates and not Path(self.root_certificates).is_file():
            raise ValueError(f"--root-certificates: {self.root_certificates} is not a file")


@dataclass
class ClientOptions(ConnectionOptions):
    """The streaming classifier's options."""

    model: str = option("served model name", "morphocam_smids")
    model_version: str = option("model version ('' = the server's version policy)", "")
    batch_size: int = option("frames per request (capped by the model's max_batch_size)", 8)
    max_wait_ms: float = option("send a partial batch after this wait (ms)", 20.0)
    max_in_flight: int = option("requests in flight at once", 4)
    timeout_s: float = option("per-request timeout, seconds", 30.0, flag="--timeout")
    retry_deadline_s: float = option("give up after retrying a batch this many seconds (servers down)", 120.0,
                                     flag="--retry-deadline")
    backoff_initial_s: float = option("first rest of a failing server, seconds (doubles per failure)", 0.1)
    backoff_max_s: float = option("longest rest of a failing server, seconds", 2.0)
    workers: int = option("decode/resize worker threads", 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "max_in_flight", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and timeout_s > 0")
