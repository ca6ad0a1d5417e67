"""Streaming classification over gRPC: decode in a worker pool, batch by size and by maximum wait,
a bounded number of asynchronous requests in flight over one or more servers, retries with
exponential backoff, and exactly one result per frame, yielded in input order.

Data flow (threads)::

    reader --(decode jobs)--> worker pool --(in-order futures, bounded queue)--> batcher
    batcher --(batch; in-flight semaphore)--> async_infer on the least-busy healthy server
    gRPC callback --> result by sequence number --> caller's generator yields them in order

A window semaphore bounds how many frames are between the reader and the caller, so memory stays
bounded whatever the input size. A batch that fails with a transient status (UNAVAILABLE,
DEADLINE_EXCEEDED, ...) is sent again, to another server when one is healthy, until
``retry_deadline_s``; its frames get their result from whichever attempt succeeds, and each
sequence number is delivered once, so a retry can never duplicate a result.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from morphocam.contract import DATASET_CLASSES, INPUT_DTYPE, INPUT_NAME, OUTPUT_PROBABILITIES, dataset_for_model
from morphocam.preprocess import ImageDecodeError, load_frame

from morphocam.clients.sources import Frame, iterator_frames

INT32_MAX = 2**31 - 1

# gRPC status codes a retry can cure: the server is restarting, overloaded or slow.
TRANSIENT_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED")
# Messages that mean the model is (re)loading: transient once we have seen the model served.
TRANSIENT_MESSAGES = ("not ready", "unknown model", "is not found", "failed to connect", "connection refused",
                      "socket closed", "stub process", "unavailable", "deadline exceeded", "shutting down")


class ServerUnavailable(RuntimeError):
    """No server answered within the retry deadline; the results so far have been yielded."""


@dataclass
class ModelInfo:
    name: str
    height: int
    width: int
    classes: tuple[str, ...]
    max_batch_size: int = 32
    version: str = ""


@dataclass
class ClientOptions:
    urls: Sequence[str] = ("127.0.0.1:8001",)
    model: str = "morphocam_smids"
    model_version: str = ""
    batch_size: int = 8
    max_wait_ms: float = 20.0
    max_in_flight: int = 4
    timeout_s: float = 30.0            # per request
    retry_deadline_s: float = 120.0    # how long one batch may keep retrying transient failures
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    workers: int = 2
    ssl: bool = False
    root_certificates: str | None = None

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("give at least one --url")
        for name in ("batch_size", "max_in_flight", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and timeout_s > 0")


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


def _dims(values) -> list[int]:
    return [int(v) for v in values]


def parse_classification(entries: np.ndarray, num_classes: int) -> tuple[str, ...] | None:
    """Class names from Triton's classification output (``score:index:label`` bytes per class)."""
    names: dict[int, str] = {}
    for raw in np.asarray(entries).reshape(-1):
        text = raw.decode("utf-8") if isinstance(raw, (bytes, np.bytes_)) else str(raw)
        parts = text.split(":", 2)
        if len(parts) == 3 and parts[1].lstrip("-").isdigit():
            names[int(parts[1])] = parts[2]
    if len(names) != num_classes or sorted(names) != list(range(num_classes)) or not all(names.values()):
        return None
    return tuple(names[i] for i in range(num_classes))


def discover_model(pool: ServerPool, model: str, version: str = "", deadline_s: float = 60.0,
                   timeout_s: float = 10.0) -> ModelInfo:
    """Input size, batch limit and class names from the first server that answers."""
    import tritonclient.grpc as grpcclient

    end = time.monotonic() + deadline_s
    last: BaseException | None = None
    attempt = 0
    while True:
        for ep in pool.endpoints:
            try:
                cfg = ep.client.get_model_config(model, model_version=version, as_json=True,
                                                 client_timeout=timeout_s)["config"]
                inp = next(i for i in cfg["input"] if i["name"] == INPUT_NAME)
                dims = _dims(inp["dims"])
                if len(dims) != 3 or dims[2] != 3:
                    raise ValueError(f"{model}: input {INPUT_NAME} has dims {dims}, expected [H, W, 3]")
                out = next(o for o in cfg["output"] if o["name"] == OUTPUT_PROBABILITIES)
                k = _dims(out["dims"])[-1]
                height, width = dims[0], dims[1]
                # Class names: the classification extension reads them from the model's label file.
                probe = grpcclient.InferInput(INPUT_NAME, [1, height, width, 3], INPUT_DTYPE)
                probe.set_data_from_numpy(np.zeros((1, height, width, 3), np.uint8))
                res = ep.client.infer(model, [probe], model_version=version,
                                      outputs=[grpcclient.InferRequestedOutput(OUTPUT_PROBABILITIES, class_count=k)],
                                      client_timeout=timeout_s)
                classes = parse_classification(res.as_numpy(OUTPUT_PROBABILITIES), k)
                if classes is None:
                    classes = DATASET_CLASSES.get(dataset_for_model(model)) or tuple(f"class_{i}" for i in range(k))
                return ModelInfo(name=model, height=height, width=width, classes=tuple(classes),
                                 max_batch_size=int(cfg.get("max_batch_size", 0)) or 1,
                                 version=str(res.get_response().model_version))
            except (KeyboardInterrupt, SystemExit):
                raise
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001
                message = str(exc).lower()
                if not is_transient(exc) or "unknown model" in message or status_of(exc) == "NOT_FOUND":
                    raise RuntimeError(f"{ep.url}: cannot use model {model!r}: {exc}") from None
                last = exc
                pool.mark_down(ep, exc)
        if time.monotonic() >= end:
            raise ServerUnavailable(f"no server at {[e.url for e in pool.endpoints]} serves {model!r} "
                                    f"within {deadline_s:.0f} s (last error: {last})")
        attempt += 1
        time.sleep(min(2.0, 0.1 * 2 ** attempt))


def error_record(frame_id: str, reason: str, model: str = "") -> dict:
    return {"frame_id": frame_id, "status": "error", "error": reason, "model": model}


@dataclass
class _Batch:
    seqs: list[int]
    ids: list[str]
    pixels: np.ndarray
    deadline: float
    attempt: int = 0
    servers: list[str] = field(default_factory=list)


@dataclass
class RunStats:
    frames: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    retries: int = 0
    batches: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def summary(self) -> dict:
        wall = (self.ended or time.monotonic()) - self.started
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = (lambda q: float(np.percentile(lat, q)) if lat.size else None)
        return {"frames": self.frames, "classified": self.ok, "errors": self.errors, "skipped": self.skipped,
                "batches": self.batches, "retries": self.retries, "wall_s": round(wall, 3),
                "frames_per_s": round(self.frames / wall, 2) if wall > 0 else None,
                "latency_ms_mean": float(lat.mean()) if lat.size else None,
                "latency_ms_p50": pct(50), "latency_ms_p99": pct(99)}


class StreamingClassifier:
    """One streaming run. Use :func:`classify_frames` unless you need the stats or model info."""

    def __init__(self, options: ClientOptions, client_factory: Callable[[str], object] | None = None,
                 model_info: ModelInfo | None = None, decode: Callable | None = None):
        self.opt = options
        factory = client_factory or (lambda url: make_grpc_client(url, options.ssl, options.root_certificates))
        self.pool = ServerPool(options.urls, factory, options.backoff_initial_s, options.backoff_max_s)
        self.info = model_info or discover_model(self.pool, options.model, options.model_version,
                                                 deadline_s=options.retry_deadline_s,
                                                 timeout_s=options.timeout_s)
        self.batch_size = min(options.batch_size, max(1, self.info.max_batch_size))
        self.decode = decode or load_frame
        self.stats = RunStats()
        self._cv = threading.Condition()
        self._results: dict[int, dict] = {}
        self._next = 0
        self._total: int | None = None
        self._fatal: BaseException | None = None
        self._stop = threading.Event()
        self._in_flight = threading.BoundedSemaphore(options.max_in_flight)
        window = self.batch_size * (options.max_in_flight + 2) + 2 * options.workers
        self._window = threading.Semaphore(window)
        self._queue: queue.Queue = queue.Queue(maxsize=window)
        self._timers: set[threading.Timer] = set()
        self.batch_log: list[tuple[float, int]] = []  # (time sent, size): for tests and tuning

    # ---- results, in order -------------------------------------------------------------------
    def _deliver(self, seq: int, record: dict) -> None:
        with self._cv:
            if seq < self._next or seq in self._results:
                return  # already answered: never twice
            self._results[seq] = record
            self._cv.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            if self._fatal is None:
                self._fatal = exc
            self._cv.notify_all()
        self._stop.set()

    def run(self, frames: Iterable[Frame], skip_keys: set[str] | frozenset = frozenset()) -> Iterator[dict]:
        reader = threading.Thread(target=self._read, args=(frames, skip_keys), name="morphocam-reader", daemon=True)
        batcher = threading.Thread(target=self._batch_loop, name="morphocam-batcher", daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=self.opt.workers, thread_name_prefix="morphocam-decode")
        self.stats = RunStats()
        reader.start()
        batcher.start()
        try:
            while True:
                with self._cv:
                    while (self._next not in self._results and self._fatal is None
                           and not (self._total is not None and self._next >= self._total)):
                        self._cv.wait(0.5)
                    if self._next in self._results:
                        record = self._results.pop(self._next)
                        self._next += 1
                    elif self._fatal is not None:
                        raise self._fatal
                    else:
                        break
                self._window.release()
                self.stats.frames += 1
                if record.get("status") == "ok":
                    self.stats.ok += 1
                    self.stats.latencies_ms.append(record["latency_ms"])
                else:
                    self.stats.errors += 1
                yield record
        finally:
            self.stats.ended = time.monotonic()
            self._stop.set()
            for t in list(self._timers):
                t.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.pool.close()

    # ---- reader: frames -> decode jobs ---------------------------------------------------------
    def _read(self, frames: Iterable[Frame], skip_keys) -> None:
        seq = 0
        h, w = self.info.height, self.info.width
        try:
            for frame in frames:
                if self._stop.is_set():
                    return
                if skip_keys and frame.key in skip_keys:
                    self.stats.skipped += 1
                    continue
                while not self._window.acquire(timeout=0.2):
                    if self._stop.is_set():
                        return
                if frame.error is not None:
                    self._queue.put((seq, frame.id, None, frame.error))
                else:
                    fut = self._pool.submit(self.decode, frame.payload, h, w, frame.id)
                    self._queue.put((seq, frame.id, fut, None))
                seq += 1
        except BaseException as exc:  # noqa: BLE001 - a broken source ends the run with its reason
            self._fail(RuntimeError(f"reading the input failed after {seq} frames: {exc}"))
        finally:
            with self._cv:
                self._total = seq if self._fatal is None else self._total
                self._cv.notify_all()
            self._queue.put(None)

    # ---- batcher: decoded frames -> batches by size and max wait ------------------------------
    def _batch_loop(self) -> None:
        max_wait = self.opt.max_wait_ms / 1000.0
        batch: list[tuple[int, str, np.ndarray]] = []
        first_ready = 0.0
        try:
            while not self._stop.is_set():
                timeout = None if not batch else max(0.0, first_ready + max_wait - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    self._flush(batch)
                    batch = []
                    continue
                if item is None:
                    self._flush(batch)
                    return
                seq, frame_id, fut, error = item
                if fut is None:
                    self._deliver(seq, error_record(frame_id, error, self.info.name))
                    continue
                while True:
                    timeout = None if not batch else max(0.0, first_ready + max_wait - time.monotonic())
                    try:
                        pixels = fut.result(timeout=timeout)
                        break
                    except FutureTimeout:
                        self._flush(batch)  # the batch's wait is over while this frame decodes
                        batch = []
                    except ImageDecodeError as exc:
                        pixels = exc
                        break
                    except Exception as exc:  # noqa: BLE001 - any decode failure is that frame's error
                        pixels = ImageDecodeError(f"{frame_id}: {type(exc).__name__}: {exc}")
                        break
                if isinstance(pixels, Exception):
                    self._deliver(seq, error_record(frame_id, str(pixels), self.info.name))
                    continue
                if not batch:
                    first_ready = time.monotonic()
                batch.append((seq, frame_id, pixels))
                if len(batch) >= self.batch_size:
                    self._flush(batch)
                    batch = []
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)

    def _flush(self, batch: list) -> None:
        if not batch:
            return
        while not self._in_flight.acquire(timeout=0.2):
            if self._stop.is_set():
                return
        b = _Batch(seqs=[s for s, _, _ in batch], ids=[i for _, i, _ in batch],
                   pixels=np.stack([p for _, _, p in batch]),
                   deadline=time.monotonic() + self.opt.retry_deadline_s)
        self.stats.batches += 1
        self.batch_log.append((time.monotonic(), len(batch)))
        self._send(b)

    # ---- sending with retries ------------------------------------------------------------------
    def _schedule(self, delay: float, batch: _Batch) -> None:
        timer = threading.Timer(delay, self._send, args=(batch,))
        timer.daemon = True
        self._timers.add(timer)
        timer.start()

    def _send(self, batch: _Batch) -> None:
        if self._stop.is_set():
            self._in_flight.release()
            return
        ep = self.pool.pick()
        if ep is None:
            self._retry_or_fail(batch, None, None)
            return
        try:
            import tritonclient.grpc as grpcclient

            inp = grpcclient.InferInput(INPUT_NAME, list(batch.pixels.shape), INPUT_DTYPE)
            inp.set_data_from_numpy(batch.pixels)
            out = [grpcclient.InferRequestedOutput(OUTPUT_PROBABILITIES)]
            sent = time.monotonic()
            batch.servers.append(ep.url)
            ep.client.async_infer(self.info.name, [inp], callback=lambda result, error: self._done(
                batch, ep, sent, result, error), model_version=self.opt.model_version, outputs=out,
                client_timeout=self.opt.timeout_s)
        except BaseException as exc:  # noqa: BLE001 - a refused send is handled like a failed reply
            self._done(batch, ep, time.monotonic(), None, exc)

    def _done(self, batch: _Batch, ep: Endpoint, sent: float, result, error) -> None:
        try:
            self._handle_reply(batch, ep, sent, result, error)
        except BaseException as exc:  # noqa: BLE001 - a bug here must end the run, never hang it
            self._fail(exc)

    def _handle_reply(self, batch: _Batch, ep: Endpoint, sent: float, result, error) -> None:
        self.pool.release(ep)
        if error is None:
            try:
                probs = np.asarray(result.as_numpy(OUTPUT_PROBABILITIES), dtype=np.float64)
                if probs.shape != (len(batch.seqs), len(self.info.classes)):
                    raise ValueError(f"server returned {OUTPUT_PROBABILITIES} of shape {probs.shape}, "
                                     f"expected {(len(batch.seqs), len(self.info.classes))}")
                version = str(result.get_response().model_version)
            except Exception as exc:  # noqa: BLE001
                self._finish_with_errors(batch, f"bad response from {ep.url}: {exc}")
                return
            self.pool.mark_ok(ep)
            latency = (time.monotonic() - sent) * 1000.0
            for seq, frame_id, p in zip(batch.seqs, batch.ids, probs):
                k = int(np.argmax(p))
                self._deliver(seq, {
                    "frame_id": frame_id, "status": "ok", "predicted_class": self.info.classes[k],
                    "class_index": k, "confidence": round(float(p[k]), 6),
                    "probabilities": {c: round(float(v), 6) for c, v in zip(self.info.classes, p)},
                    "model": self.info.name, "model_version": version, "server": ep.url,
                    "latency_ms": round(latency, 3), "attempts": batch.attempt + 1})
            self._in_flight.release()
            return
        if is_transient(error):
            self.pool.mark_down(ep, error)
            self._retry_or_fail(batch, ep, error)
        else:
            self._finish_with_errors(batch, f"server {ep.url} refused the batch: "
                                            f"{status_of(error) or type(error).__name__}: {error}")

    def _retry_or_fail(self, batch: _Batch, ep: Endpoint | None, error) -> None:
        now = time.monotonic()
        if now >= batch.deadline:
            self._in_flight.release()
            details = "; ".join(f"{e.url}: {e.last_error}" for e in self.pool.endpoints)
            self._fail(ServerUnavailable(f"gave up after {self.opt.retry_deadline_s:.0f} s of retries "
                                         f"({details})"))
            return
        if error is not None:
            batch.attempt += 1
            self.stats.retries += 1
        # Another server may be healthy right now: then go at once, otherwise wait for the first to rest.
        delay = self.pool.wait_time()
        if ep is None:
            delay = max(delay, 0.05)
        self._schedule(min(delay, max(0.0, batch.deadline - now)), batch)

    def _finish_with_errors(self, batch: _Batch, reason: str) -> None:
        for seq, frame_id in zip(batch.seqs, batch.ids):
            self._deliver(seq, error_record(frame_id, reason, self.info.name))
        self._in_flight.release()


def classify_frames(frames: Iterable, urls: Sequence[str] | str = ("127.0.0.1:8001",),
                    model: str = "morphocam_smids", skip_keys: set[str] | frozenset = frozenset(),
                    client_factory: Callable[[str], object] | None = None,
                    model_info: ModelInfo | None = None, **options) -> Iterator[dict]:
    """Classify frames; yields exactly one record per frame, in input order.

    ``frames``: :class:`~morphocam.clients.sources.Frame` objects, ``(id, array_or_path)`` pairs, paths or
    arrays (see :func:`morphocam.clients.sources.iterator_frames`). Other keyword arguments are
    :class:`ClientOptions` fields (``batch_size``, ``max_wait_ms``, ``max_in_flight``, ...).
    """
    if isinstance(urls, str):
        urls = [urls]
    opts = ClientOptions(urls=tuple(urls), model=model, **options)
    classifier = StreamingClassifier(opts, client_factory=client_factory, model_info=model_info)
    yield from classifier.run(iterator_frames(frames), skip_keys)
