"""Serving benchmark: in-process engines (the ceiling) vs the real Triton server, in one run.

The in-process ceiling is the fastest engine on the exported ONNX graph (ONNX Runtime with graph
optimisation ALL, OpenVINO FP32 and bf16) at batch 1/8/32. The served figures come from the stock
``tritonclient.grpc`` keeping N requests in flight against the real server on loopback; the average
server-side batch size comes from Triton's own statistics. The client shares the machine's cores
with the server, so its cost lowers the served figure: the JSON records the core count.

Each ``--classifier-engines`` entry (default: ``native`` = Triton's own ONNX Runtime backend, then
``python-ort`` = the Python-backend model.py running ONNX Runtime) is served on its own server in the
same run, against the same ceiling: ``engines.<name>`` in the JSON; the first engine's rows are also
at the top level.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from morphocam.atomic import atomic_write_text
from morphocam.config import option
from morphocam.contract import EXPLAIN_SUFFIX, INPUT_NAME, OUTPUT_PROBABILITIES, InputContract
from morphocam.preprocess import is_image_path, load_frame

from morphocam.export.engines import cpu_name, openvino_bf16_supported

from .procfs import process_table, tree_cpu_seconds

GFLOP_PER_IMAGE_224 = 0.77  # EfficientNet-B0 + CBAM at 224x224 (NOTES.md); scales with pixels




@dataclass
class ServingBenchConfig:
    model_repository: Path = option("Triton model repository", Path("model_repository"))
    model: str = option("classifier model name", "morphocam_hushem")
    images: Path = option("folder of real images to send", Path("samples"))
    output_dir: Path = option("results folder", Path("results/benchmarks/serving"))
    batches: tuple[int, ...] = option("in-process batch sizes", (1, 8, 32))
    concurrency: tuple[int, ...] = option("requests in flight", (1, 4, 16, 64))
    request_batches: tuple[int, ...] = option("frames per request for the served runs", (1, 8))
    seconds: float = option("seconds per served measurement", 8.0)
    inprocess_seconds: float = option("seconds per in-process measurement", 4.0)
    explain: bool = option("also time the explanation model at batch 1 and 8", True)
    shared_memory: bool = option("also send the frames through Triton's system shared memory", True)
    perf_analyzer: Optional[Path] = option("perf_analyzer binary for a comparison run "
                                           "(default: $MORPHOCAM_PERF_ANALYZER or PATH; skipped if absent)", None)
    streaming: bool = option("also time the CASA streaming client (clients.streaming) end to end", True)
    stream_frames: int = option("frames the streaming client sends", 3000)
    # serve the released model under other settings (None = as in the repository's config.pbtxt)
    engine: Optional[str] = option("override the classifier engine (onnxruntime | openvino)", None)
    precision: Optional[str] = option("override the engine precision (fp32 | bf16)", None)
    instances: Optional[int] = option("override the instance count", None)
    threads: Optional[int] = option("override engine threads per instance", None)
    queue_delay_us: Optional[int] = option("override the dynamic-batching queue delay (microseconds)", None)
    queue_policy: Optional[bool] = option("false: serve without max_queue_size/timeout (Triton's prefetching "
                                          "batcher); default: as in the config", None)
    classifier_engines: tuple[str, ...] = option(
        "classifier engines served one after the other in this run, each on its own server: native (Triton's "
        "ONNX Runtime backend) | python-ort | openvino (Python backend); ignored with --engine", ("native", "python-ort"))

    def variant(self, classifier_engine: Optional[str] = None):
        from .variants import ServingVariant

        return ServingVariant(self.engine, self.precision, self.instances, self.threads, self.queue_delay_us,
                              classifier_engine=classifier_engine, queue_policy=self.queue_policy)


def _best_matmul_gflops(matmul, a, repeats: int) -> float:
    matmul(a, a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.shape[0] ** 3 / best / 1e9


def matmul_peak_gflops(n: int = 4096, repeats: int = 3) -> dict:
    """FP32 matrix-multiply peak of this machine with numpy (OpenBLAS) and torch (oneDNN/MKL).

    Both are measured because numpy's bundled OpenBLAS picks its kernels from the CPU model and can
    fall back to generic ones on CPUs it does not know (seen here: a new Xeon detected as
    "Prescott", 4x below torch); ``peak`` is the higher of the two.
    """
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out = {"numpy": _best_matmul_gflops(np.matmul, a, repeats)}
    try:
        from threadpoolctl import threadpool_info

        out["numpy_openblas_kernels"] = next((i.get("architecture") for i in threadpool_info()
                                              if i.get("internal_api") == "openblas"), None)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    try:
        import torch

        out["torch"] = _best_matmul_gflops(torch.matmul, torch.from_numpy(a), repeats)
    except ImportError:  # pragma: no cover - torch is a project dependency
        pass
    out["peak"] = max(v for k, v in out.items() if k in ("numpy", "torch"))
    return out


def load_images(folder: Path, contract: InputContract, count: int = 64) -> np.ndarray:
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_path(p))
    if not paths:
        raise FileNotFoundError(f"no images under {folder}")
    frames = [load_frame(p, contract.height, contract.width) for p in paths[:count]]
    while len(frames) < count:
        frames += frames[: count - len(frames)]
    return np.stack(frames)


def _time_loop(fn, seconds: float, per_call: int) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += per_call
    return n / (time.perf_counter() - t0)


def inprocess(onnx_path: Path, frames: np.ndarray, batches, seconds: float) -> dict:
    import onnxruntime as ort
    import openvino as ov

    threads = os.cpu_count() or 1
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    core = ov.Core()
    engines = {"onnxruntime_fp32": lambda b: sess.run(None, {INPUT_NAME: b})}
    bf16 = openvino_bf16_supported()
    for prec, hint in (("openvino_fp32", "f32"), ("openvino_bf16", "bf16")):
        if hint == "bf16" and not bf16:
            print("[inprocess] openvino_bf16 skipped: this CPU has no native BF16 (it would silently run f32)")
            continue
        try:
            compiled = core.compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                                  "INFERENCE_NUM_THREADS": threads})
        except RuntimeError as exc:  # bf16 unsupported on this CPU
            print(f"[inprocess] {prec} unavailable: {exc}")
            continue
        engines[prec] = (lambda c: (lambda b: c(b)))(compiled)
    out: dict = {}
    for name, run in engines.items():
        for b in batches:
            batch = frames[:b]
            out.setdefault(name, {})[str(b)] = _time_loop(lambda: run(batch), seconds, b)
            print(f"[inprocess] {name:18s} batch {b:3d}: {out[name][str(b)]:7.1f} img/s", flush=True)
    return out


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
    cores = os.cpu_count() or 1
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
            "client_cpu_share": (time.process_time() - cpu0) / elapsed / (os.cpu_count() or 1)}


def ceiling(inprocess_rows: dict, precision: str | None) -> tuple[float, str]:
    """(img/s, "file:engine@batch") of the fastest in-process engine at the served ``precision``.

    The served model is compared with engines computing the same numbers: a bf16 engine is faster
    but is not the released FP32 model (the exporter keeps it out when it costs accuracy).
    ``precision=None``: the fastest engine of any precision.
    """
    rows = [(v, f"{f}:{e}@{b}") for f, engines in inprocess_rows.items() for e, per_b in engines.items()
            for b, v in per_b.items() if precision is None or e.endswith(f"_{precision}")]
    if not rows:
        raise ValueError(f"no in-process measurement at precision {precision!r}: {list(inprocess_rows)}")
    return max(rows)


def _add_ratios(row: dict, ceiling: float) -> dict:
    row["ratio_to_ceiling"] = row["images_per_s"] / ceiling
    # What the server made of the CPU the client left it: the same ratio against the ceiling scaled
    # to the share of the machine the client did not use.
    left = 1.0 - (row.get("client_cpu_share") or 0.0)
    row["ratio_to_ceiling_cpu_left"] = row["images_per_s"] / (ceiling * left) if left > 0 else None
    return row


def _fmt(row: dict) -> str:
    batch = row.get("avg_server_batch")
    return (f"{row['images_per_s']:7.1f} img/s p50 {row['p50_ms'] or 0:.1f} p99 {row['p99_ms'] or 0:.1f} ms"
            + (f", server batch {batch:.1f}" if batch else "")
            + (f", in server: queue {row['server_queue_ms']:.1f} + compute {row['server_compute_infer_ms']:.1f} ms"
               if "server_queue_ms" in row else "")
            + f", ratio {row['ratio_to_ceiling']:.2f} ({row['ratio_to_ceiling_cpu_left']:.2f} of the CPU the client "
            f"left, client {100 * row['client_cpu_share']:.0f}% of the machine), errors {row['errors']}")


def serve_rows(cfg: ServingBenchConfig, repository: Path, frames: np.ndarray, contract: InputContract,
               best: float) -> dict:
    """Every served measurement on one real server: 1- and n-frame requests at each concurrency, shared
    memory, the CASA streaming client, perf_analyzer, the explanation model; ratios to ``best``."""
    from morphocam.serving.launcher import TritonServer

    out: dict = {}
    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0) as srv:
        out["server_startup_s"] = srv.startup_seconds
        pids = list(process_table(srv.process).values())
        rows = []
        for per_request in cfg.request_batches:
            for c in cfg.concurrency:
                row = _add_ratios(served(srv.grpc_url, cfg.model, frames, c, per_request, cfg.seconds,
                                         server_pids=pids), best)
                rows.append(row)
                print(f"[served] {per_request:2d} frames/request, {c:3d} in flight: {_fmt(row)}", flush=True)
        if cfg.shared_memory:
            for c in (4, 16):
                row = _add_ratios(served(srv.grpc_url, cfg.model, frames, c, 1, cfg.seconds, transport="shm",
                                         server_pids=pids), best)
                rows.append(row)
                print(f"[served] shared memory, 1 frame/request, {c:3d} in flight: {_fmt(row)}", flush=True)
        out["served"] = rows
        if cfg.streaming:
            row = _add_ratios(streaming_client(srv.grpc_url, cfg.model, frames, cfg.stream_frames), best)
            out["streaming_client"] = row
            print(f"[streaming client] {row['records']} records for {row['frames']} frames: {_fmt(row)}", flush=True)
        from . import perf_analyzer

        binary = perf_analyzer.find(cfg.perf_analyzer)
        if binary is not None:
            pa = perf_analyzer.run(binary, srv.grpc_url, cfg.model, 16, (contract.height, contract.width, 3),
                                   seconds=cfg.seconds)
            pa["ratio_to_ceiling"] = pa["images_per_s"] / best
            out["perf_analyzer"] = pa
            print(f"[perf_analyzer] 1 frame/request, 16 in flight: {pa['images_per_s']:7.1f} img/s "
                  f"p50 {pa['p50_ms']:.1f} p99 {pa['p99_ms']:.1f} ms, ratio {pa['ratio_to_ceiling']:.2f}", flush=True)
        else:
            out["perf_analyzer"] = "not found (see README: perf_analyzer from the tritonclient 2.50.0 wheel)"
        explain_model = f"{cfg.model}{EXPLAIN_SUFFIX}"
        if cfg.explain and (repository / explain_model).is_dir():
            out["explain"] = explain_latency(srv.grpc_url, explain_model, frames)
    return out


def run(cfg: ServingBenchConfig) -> dict:
    import shutil
    import tempfile

    from .variants import describe, write_variant

    version_dir = cfg.model_repository / cfg.model / "1"
    contract = InputContract.load(version_dir / "contract.json")
    frames = load_images(cfg.images, contract)
    gflop = GFLOP_PER_IMAGE_224 * contract.height * contract.width / 224 ** 2
    peak = matmul_peak_gflops()
    print(f"[machine] {os.cpu_count()} cores, FP32 matmul peak {peak['peak']:.0f} GFLOP/s (numpy {peak['numpy']:.0f}"
          f" with OpenBLAS {peak.get('numpy_openblas_kernels')} kernels, torch {peak.get('torch', 0):.0f}) "
          f"-> compute bound {peak['peak'] / gflop:.0f} img/s at {gflop:.2f} GFLOP/image", flush=True)
    result: dict = {"model": cfg.model, "cores": os.cpu_count(), "cpu": cpu_name(), "matmul": peak,
                    "matmul_peak_gflops": peak["peak"], "gflop_per_image": gflop,
                    "input": [contract.height, contract.width]}
    onnx_files = {p.name: p for p in version_dir.glob("*.onnx")}
    result["inprocess"] = {name: inprocess(p, frames, cfg.batches, cfg.inprocess_seconds)
                           for name, p in sorted(onnx_files.items())}
    # One server per classifier engine, same frames, same ceiling: native backend vs Python backend.
    choices = [None] if cfg.engine else list(dict.fromkeys(cfg.classifier_engines))
    result["engines"] = {}
    scratch = Path(tempfile.mkdtemp(prefix="morphocam-variant-"))
    try:
        for choice in choices:
            variant = cfg.variant(choice)
            repository = write_variant(cfg.model_repository, cfg.model, variant, scratch / "repo")
            served_config = {**describe(repository / cfg.model / "config.pbtxt"),
                             "variant_of_released": variant.label()}
            print(f"[served] config {served_config}", flush=True)
            best = ceiling(result["inprocess"], served_config["precision"])
            if not result["engines"]:
                result["ceiling_images_per_s"], result["ceiling"] = best
                result["ceiling_fraction_of_peak"] = best[0] * gflop / peak["peak"]
                result["fastest_inprocess_any_precision"] = ceiling(result["inprocess"], None)
            rows = {"served_config": served_config, "ceiling_images_per_s": best[0], "ceiling": best[1],
                    **serve_rows(cfg, repository, frames, contract, best[0])}
            result["engines"][served_config["classifier_engine"] or variant.label()] = rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # The first engine's rows at the top level, as before (plots, older readers).
    first = next(iter(result["engines"].values()))
    result.update({k: v for k, v in first.items() if k not in ("ceiling_images_per_s", "ceiling")})
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output_dir / "serving.json", json.dumps(result, indent=2) + "\n")
    plot(result, cfg.output_dir / "serving.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["transport"], r["frames_per_request"]) for r in result["served"]}):
        rows = [r for r in result["served"] if (r["transport"], r["frames_per_request"]) == key]
        label = f"{key[0]}, {key[1]} frame(s)/request"
        a1.plot([r["concurrency"] for r in rows], [r["images_per_s"] for r in rows], "o-", label=label)
        a2.plot([r["concurrency"] for r in rows], [r["p99_ms"] for r in rows], "o-", label=label)
    pa = result.get("perf_analyzer")
    if isinstance(pa, dict):
        a1.plot([pa["concurrency"]], [pa["images_per_s"]], "k*", ms=10, label="perf_analyzer")
        a2.plot([pa["concurrency"]], [pa["p99_ms"]], "k*", ms=10, label="perf_analyzer")
    a1.axhline(result["ceiling_images_per_s"], color="k", ls="--", label=f"in-process ceiling ({result['ceiling']})")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests in flight")
        ax.legend(fontsize=7)
    a1.set_ylabel("images/s")
    a2.set_ylabel("p99 latency (ms)")
    fig.suptitle(f"{result['model']} on {result['cores']} CPU cores (client on the same cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
