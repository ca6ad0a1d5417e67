"""The load generator: real requests against the running server, and what they cost.

The stock ``tritonclient.grpc`` keeps N requests in flight (over gRPC or Triton's system shared
memory); the average server-side batch comes from Triton's own statistics. The client shares the
machine's cores with the server, so the CPU each used is reported as a share of the cores this
process may run on. Also: the explanation model's latency and the CASA streaming client end to end.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from morphocam.contract import INPUT_NAME, OUTPUT_PROBABILITIES
from morphocam.engines import affinity_cores

from .procfs import tree_cpu_seconds


STAT_PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def _stats(client, model: str) -> dict:
    """Triton's cumulative statistics of ``model``: inferences, executions, and per phase the summed
    nanoseconds over requests (``<phase>_ns``) with the count of successful requests."""
    s = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"][0]
    st = s.get("inference_stats", {})
    return {"inferences": int(s.get("inference_count", 0)), "executions": int(s.get("execution_count", 0)),
            "requests": int(st.get("success", {}).get("count", 0)),
            **{f"{k}_ns": int(st.get(k, {}).get("ns", 0)) for k in STAT_PHASES}}


def server_time_split(before: dict, after: dict) -> dict:
    """Mean milliseconds a request spent in the server, split by phase (where the time goes: waiting
    in the batcher queue vs computing), over the requests between the two snapshots."""
    n = after["requests"] - before["requests"]
    if n <= 0:
        return {}
    return {f"server_{k}_ms": (after[f"{k}_ns"] - before[f"{k}_ns"]) / n / 1e6 for k in STAT_PHASES}


def wait_idle(url: str, model: str, timeout: float = 30.0) -> None:
    """Let the queue drain (e.g. requests that timed out in an overload run) before the next run."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _stats(client, model)
        if now == last:
            break
        last = now
        time.sleep(1.0)
    client.close()


def served(url: str, model: str, frames: np.ndarray, concurrency: int, per_request: int,
           seconds: float, transport: str = "grpc", server_pids=()) -> dict:
    """Keep ``concurrency`` requests of ``per_request`` frames in flight for ``seconds``.

    ``transport="shm"`` puts the frames in a system shared-memory region registered with the server,
    so a request carries only an offset (what a CASA box on the same host would do).
    The CPU time this client process used, and that of ``server_pids`` (the server and its stubs),
    are reported as shares of the machine: client and server share the same cores here.
    """
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    region = None
    if transport == "shm":
        import tritonclient.utils.shared_memory as shm

        name = f"morphocam_bench_{os.getpid()}"
        region = shm.create_shared_memory_region(name, f"/{name}", frames.nbytes)
        shm.set_shared_memory_region(region, [np.ascontiguousarray(frames)])
        client.register_system_shared_memory(name, f"/{name}", frames.nbytes)
    frame_bytes = int(np.prod(frames.shape[1:]))
    inputs = []
    for start in range(0, len(frames) - per_request + 1, per_request):
        inp = grpcclient.InferInput(INPUT_NAME, [per_request, *frames.shape[1:]], "UINT8")
        if region is not None:
            inp.set_shared_memory(name, per_request * frame_bytes, offset=start * frame_bytes)
        else:
            inp.set_data_from_numpy(frames[start:start + per_request])
        inputs.append(inp)
    outputs = [grpcclient.InferRequestedOutput(OUTPUT_PROBABILITIES)]
    client.infer(model, [inputs[0]], outputs=outputs)  # warm path
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    state = {"sent": 0, "inflight": 0}
    deadline = [0.0]

    def submit():
        with lock:
            i = state["sent"]
            state["sent"] += 1
            state["inflight"] += 1
        t = time.perf_counter()
        client.async_infer(model, [inputs[i % len(inputs)]], callback=lambda result, error, t=t: finish(t, result, error),
                           outputs=outputs, client_timeout=30)

    def finish(t, result, error):
        now = time.perf_counter()
        with lock:
            state["inflight"] -= 1
            if error is not None:
                errors.append(str(error))
            else:
                lat.append(now - t)
            again = now < deadline[0]
            if not again and state["inflight"] == 0:
                done.set()
        if again:
            submit()

    wait_idle(url, model)
    before = _stats(client, model)
    cpu0, server_cpu0 = time.process_time(), tree_cpu_seconds(server_pids)
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    for _ in range(concurrency):
        submit()
    done.wait(seconds + 60)
    elapsed = time.perf_counter() - t0
    cores = affinity_cores()
    client_share = (time.process_time() - cpu0) / elapsed / cores
    server_share = (tree_cpu_seconds(server_pids) - server_cpu0) / elapsed / cores if server_pids else None
    after = _stats(client, model)
    if region is not None:
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(region)
    client.close()
    ms = np.array(lat) * 1e3
    inf, exe = after["inferences"] - before["inferences"], after["executions"] - before["executions"]
    return {"transport": transport, "concurrency": concurrency, "frames_per_request": per_request,
            "requests": len(lat),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "images_per_s": len(lat) * per_request / elapsed,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "avg_server_batch": inf / exe if exe else None,
            "requests_over_400ms": int((ms > 400).sum()),
            "client_cpu_share": client_share, "server_cpu_share": server_share,
            **server_time_split(before, after)}


def explain_latency(url: str, model: str, frames: np.ndarray, batches=(1, 8), repeats: int = 5) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    out = {}
    for b in batches:
        inp = grpcclient.InferInput(INPUT_NAME, [b, *frames.shape[1:]], "UINT8")
        inp.set_data_from_numpy(frames[:b])
        client.infer(model, [inp], client_timeout=120)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            client.infer(model, [inp], client_timeout=120)
            times.append(time.perf_counter() - t)
        out[str(b)] = {"ms_per_request": 1e3 * float(np.median(times)), "ms_per_image": 1e3 * float(np.median(times)) / b}
        print(f"[explain] batch {b}: {out[str(b)]['ms_per_image']:.1f} ms/image", flush=True)
    client.close()
    return out


def streaming_client(url: str, model: str, frames: np.ndarray, count: int, batch_size: int = 8,
                     in_flight: int = 4) -> dict:
    """The CASA client (:mod:`morphocam.clients.streaming`) classifying ``count`` decoded frames end to end:
    its batcher, in-flight window, ordered delivery and one record per frame included."""
    from morphocam.clients.streaming import StreamingClassifier, ClientOptions
    from morphocam.clients.sources import iterator_frames

    opts = ClientOptions(urls=(url,), model=model, batch_size=batch_size, max_in_flight=in_flight, workers=1)
    items = ((f"frame{i}", frames[i % len(frames)]) for i in range(count))
    classifier = StreamingClassifier(opts)
    cpu0, t0 = time.process_time(), time.perf_counter()
    records = list(classifier.run(iterator_frames(items)))
    elapsed = time.perf_counter() - t0
    stats = classifier.stats.summary()
    return {"transport": "streaming client", "frames_per_request": batch_size, "concurrency": in_flight,
            "frames": count, "records": len(records), "errors": sum(r.get("status") == "error" for r in records),
            "images_per_s": len(records) / elapsed, "p50_ms": stats.get("latency_ms_p50"), "p99_ms": stats.get("latency_ms_p99"),
            "client_cpu_share": (time.process_time() - cpu0) / elapsed / affinity_cores()}


def add_ratios(row: dict, ceiling: float) -> dict:
    row["ratio_to_ceiling"] = row["images_per_s"] / ceiling
    # What the server made of the CPU the client left it: the same ratio against the ceiling scaled
    # to the share of the machine the client did not use.
    left = 1.0 - (row.get("client_cpu_share") or 0.0)
    row["ratio_to_ceiling_cpu_left"] = row["images_per_s"] / (ceiling * left) if left > 0 else None
    return row


def fmt(row: dict) -> str:
    batch = row.get("avg_server_batch")
    return (f"{row['images_per_s']:7.1f} img/s p50 {row['p50_ms'] or 0:.1f} p99 {row['p99_ms'] or 0:.1f} ms"
            + (f", server batch {batch:.1f}" if batch else "")
            + (f", in server: queue {row['server_queue_ms']:.1f} + compute {row['server_compute_infer_ms']:.1f} ms"
               if "server_queue_ms" in row else "")
            + f", ratio {row['ratio_to_ceiling']:.2f} ({row['ratio_to_ceiling_cpu_left']:.2f} of the CPU the client "
            f"left, client {100 * row['client_cpu_share']:.0f}% of the machine), errors {row['errors']}")
