"""gRPC channel settings of every client connection: no message-size cap, fast reconnects."""

from __future__ import annotations

INT32_MAX = 2**31 - 1


def grpc_channel_args() -> list[tuple[str, int]]:
    """Fast reconnects: after a server restart the channel must not sit in a long gRPC backoff."""
    return [
        ("grpc.max_send_message_length", INT32_MAX),
        ("grpc.max_receive_message_length", INT32_MAX),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # Own subchannels per channel: a fresh channel must not inherit a shared subchannel's backoff.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def make_grpc_client(url: str, ssl: bool = False, root_certificates: str | None = None):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url=url, ssl=ssl, root_certificates=root_certificates,
                                            channel_args=grpc_channel_args())
