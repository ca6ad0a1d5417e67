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

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from morphocam.contract import INPUT_DTYPE, INPUT_NAME, OUTPUT_PROBABILITIES
from morphocam.preprocess import ImageDecodeError, load_frame

from morphocam.clients.channel import grpc_channel_args, make_grpc_client
from morphocam.clients.discovery import ModelInfo, discover_model, parse_classification
from morphocam.clients.errors import (TRANSIENT_MESSAGES, TRANSIENT_STATUSES, ServerUnavailable, error_record,
                                      is_transient, status_of)
from morphocam.clients.options import ClientOptions
from morphocam.clients.run_stats import RunStats
from morphocam.clients.server_pool import Endpoint, ServerPool
from morphocam.clients.sources import Frame, iterator_frames

# The public API stays importable from here; the pieces live in one module per concern.
__all__ = ["ClientOptions", "Endpoint", "ModelInfo", "RunStats", "ServerPool", "ServerUnavailable",
           "StreamingClassifier", "TRANSIENT_MESSAGES", "TRANSIENT_STATUSES", "classify_frames", "discover_model",
           "error_record", "grpc_channel_args", "is_transient", "make_grpc_client", "parse_classification",
           "status_of"]


@dataclass
class _Batch:
    seqs: list[int]
    ids: list[str]
    pixels: np.ndarray
    deadline: float
    attempt: int = 0
    servers: list[str] = field(default_factory=list)


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
