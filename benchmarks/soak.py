"""Soak: a bounded run of mixed classify + explain traffic against a real server this command starts.

    morphocam-bench soak --minutes 10 --in-flight 32 --explain-ratio 0.1

Phases: (1) classification only for ``baseline_seconds`` (the p99 without explanation load), then
(2) ``minutes`` of mixed traffic, ``in_flight`` requests outstanding at all times, each one an
explanation with probability ``explain_ratio``. Every request carries a deadline. Reported: failed
requests (by message), classification p50/p99 with and without concurrent explanations, resident
memory (RSS) of the server and of each backend stub at start (after warm-up) and end against a
stated bound, and the server's /dev/shm segments left after shutdown. JSON + PNG in ``output_dir``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from morphocam import plotting
from morphocam.atomic import atomic_write_text
from morphocam.config import option
from morphocam.contract import INPUT_DTYPE, INPUT_NAME, InputContract, explain_model_for
from .procfs import process_table, rss_mib


@dataclass
class SoakConfig:
    model_repository: Path = option("Triton model repository (the command starts its own server on it)",
                                Path("model_repository"))
    model: str = option("classifier model name (its explainer is <model>_explain)", "morphocam_hushem")
    images: Path = option("folder of real images to send", Path("samples"))
    output_dir: Path = option("results folder", Path("results/benchmarks/soak"))
    minutes: float = option("minutes of mixed traffic", 10.0)
    in_flight: int = option("requests outstanding at all times", 32)
    explain_ratio: float = option("fraction of requests that ask for an explanation", 0.1)
    baseline_seconds: float = option("seconds of classification-only traffic first (p99 without explanations)", 60.0)
    frames_per_request: int = option("frames per classification request", 1)
    timeout_s: float = option("deadline of every request, seconds", 30.0)
    rss_growth_bound_mb: float = option("allowed RSS growth per process over the mixed phase, after the "
                                          "baseline warmed every batch shape (MiB)", 200.0)
    seed: int = option("traffic seed", 0)


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else None


class _Traffic:
    def __init__(self, url: str, cfg: SoakConfig, frames: np.ndarray, ratio: float, seconds: float):
        self.url, self.cfg, self.frames, self.ratio, self.seconds = url, cfg, frames, ratio, seconds
        self.records: list[tuple[float, str, float, str]] = []  # (t, kind, latency_ms, error or "")
        self.lock = threading.Lock()

    def worker(self, idx: int, t_end: float) -> None:
        import tritonclient.grpc as grpcclient

        rng = random.Random(self.cfg.seed * 1000 + idx)
        client = grpcclient.InferenceServerClient(self.url)
        n = self.cfg.frames_per_request
        try:
            while time.monotonic() < t_end:
                explain = rng.random() < self.ratio
                start = rng.randrange(len(self.frames))
                batch = np.take(self.frames, range(start, start + n), axis=0, mode="wrap")
                if explain:
                    batch = batch[:1]
                inp = grpcclient.InferInput(INPUT_NAME, list(batch.shape), INPUT_DTYPE)
                inp.set_data_from_numpy(batch)
                model = explain_model_for(self.cfg.model) if explain else self.cfg.model
                t0 = time.monotonic()
                err = ""
                try:
                    res = client.infer(model, [inp], client_timeout=self.cfg.timeout_s)
                    probs = res.as_numpy("PROBABILITIES")
                    if probs is None or not np.allclose(probs.sum(1), 1.0, atol=1e-3):
                        err = "invalid probabilities"
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    err = str(exc)[:200] or type(exc).__name__
                with self.lock:
                    self.records.append((t0, "explain" if explain else "classify",
                                         (time.monotonic() - t0) * 1000, err))
        finally:
            client.close()

    def run(self) -> list:
        t_end = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self.worker, args=(i, t_end), daemon=True)
                   for i in range(self.cfg.in_flight)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + self.cfg.timeout_s + 30)
        return self.records


def _summary(records, seconds: float) -> dict:
    out = {}
    for kind in ("classify", "explain"):
        rows = [r for r in records if r[1] == kind]
        ok = [r[2] for r in rows if not r[3]]
        out[kind] = {"requests": len(rows), "failed": len(rows) - len(ok), "per_s": round(len(rows) / seconds, 2),
                     "p50_ms": _pct(ok, 50), "p99_ms": _pct(ok, 99), "max_ms": max(ok) if ok else None}
    out["failures_by_message"] = dict(Counter(r[3] for r in records if r[3]).most_common(10))
    return out


def run(cfg: SoakConfig) -> dict:
    from morphocam.benchmarks.inprocess import load_images
    from morphocam.serving.launcher import TritonServer

    repo = Path(cfg.model_repository)
    contract = InputContract.load(repo / cfg.model / "1" / "contract.json")
    frames = load_images(Path(cfg.images), contract, 64)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=300)
    server.start()
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
    try:
        procs = process_table(server)
        # one request of each kind first, so start RSS is measured after warm-up
        import tritonclient.grpc as grpcclient

        c = grpcclient.InferenceServerClient(server.grpc_url)
        for model in (cfg.model, explain_model_for(cfg.model)):
            inp = grpcclient.InferInput(INPUT_NAME, [1, *frames.shape[1:]], INPUT_DTYPE)
            inp.set_data_from_numpy(frames[:1])
            c.infer(model, [inp], client_timeout=cfg.timeout_s)
        c.close()
        rss_start = {name: rss_mib(pid) for name, pid in procs.items()}
        print(f"[soak] server up ({server.startup_seconds:.1f} s); processes {list(procs)}; baseline "
              f"{cfg.baseline_seconds:.0f} s classify-only, then {cfg.minutes:g} min mixed, {cfg.in_flight} in flight, "
              f"explain ratio {cfg.explain_ratio}", flush=True)
        base = _Traffic(server.grpc_url, cfg, frames, 0.0, cfg.baseline_seconds).run()
        # Growth is measured from here: the baseline has sent every batch size the dynamic batcher
        # forms, and engines keep per-shape buffers (OpenVINO: 138 -> 866 MiB over batch sizes 1..32,
        # then flat), which is a bounded cache, not a leak.
        rss_cold, rss_start = rss_start, {name: rss_mib(pid) for name, pid in procs.items()}
        mixed_s = cfg.minutes * 60
        samples = []
        stop = threading.Event()

        def sample_rss():
            t0 = time.monotonic()
            while not stop.wait(max(1.0, mixed_s / 100)):
                samples.append({"t": time.monotonic() - t0, **{n: rss_mib(p) for n, p in procs.items()}})

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        mixed = _Traffic(server.grpc_url, cfg, frames, cfg.explain_ratio, mixed_s).run()
        stop.set()
        rss_end = {name: rss_mib(pid) for name, pid in procs.items()}
        growth = {n: (rss_end[n] - rss_start[n]) if rss_end.get(n) and rss_start.get(n) else None for n in procs}
        result.update({
            "baseline_classify_only": _summary(base, max(cfg.baseline_seconds, 1e-9)),
            "mixed": _summary(mixed, max(mixed_s, 1e-9)),
            "rss_mib": {"cold": rss_cold, "start": rss_start, "end": rss_end, "growth": growth,
                        "bound": cfg.rss_growth_bound_mb,
                        "samples": samples},
        })
        result["rss_within_bound"] = all(g is not None and g <= cfg.rss_growth_bound_mb for g in growth.values())
    finally:
        code = server.stop()
    leaked = [str(p) for p in Path("/dev/shm").glob(f"{server.shm_prefix}*")]
    failed = sum(result.get(k, {}).get(kind, {}).get("failed", 0) for k in ("baseline_classify_only", "mixed")
                 for kind in ("classify", "explain"))
    result.update({"server_exit_code": code, "shm_segments_after_shutdown": leaked, "failed_requests": failed,
                   "cores": __import__("os").cpu_count()})
    b, m = result["baseline_classify_only"]["classify"], result["mixed"]["classify"]
    result["classify_p99_ratio_mixed_vs_baseline"] = (m["p99_ms"] / b["p99_ms"]) if b["p99_ms"] and m["p99_ms"] else None
    atomic_write_text(out_dir / "soak.json", json.dumps(result, indent=2) + "\n")
    _plot(result, base, mixed, out_dir / "soak.png")
    print(f"[soak] failed requests {failed}; classify p99 {b['p99_ms'] or 0:.1f} ms alone vs {m['p99_ms'] or 0:.1f} ms "
          f"with explanations ({result['mixed']['explain']['requests']} explanations); RSS growth (MiB) "
          f"{ {k: round(v, 1) if v is not None else None for k, v in result['rss_mib']['growth'].items()} } "
          f"(bound {cfg.rss_growth_bound_mb}); shm left {len(leaked)}; -> {out_dir}/soak.json", flush=True)
    return result


def passed(result: dict) -> bool:
    """The soak's verdict (the command's exit status): no failed request, RSS growth within the bound,
    no shared-memory segment left behind."""
    return bool(result["failed_requests"] == 0 and result.get("rss_within_bound")
                and not result["shm_segments_after_shutdown"])


def _plot(result: dict, base, mixed, path: Path) -> None:
    fig, (a, b) = plotting.subplots(1, 2, figsize=(11, 4))
    for recs, label in ((base, "classify, alone"), (mixed, "classify, with explain load")):
        lat = [r[2] for r in recs if r[1] == "classify" and not r[3]]
        if lat:
            a.hist(lat, bins=40, alpha=0.6, label=f"{label} (p99 {np.percentile(lat, 99):.0f} ms)")
    ex = [r[2] for r in mixed if r[1] == "explain" and not r[3]]
    if ex:
        a.hist(ex, bins=40, alpha=0.5, label=f"explain (p99 {np.percentile(ex, 99):.0f} ms)")
    a.set_xlabel("latency (ms)")
    a.set_ylabel("requests")
    a.legend(fontsize=7)
    a.set_title(f"failed requests: {result['failed_requests']}")
    samples = result["rss_mib"]["samples"]
    for name in result["rss_mib"]["start"]:
        ys = [s.get(name) for s in samples]
        b.plot([s["t"] for s in samples], ys, label=name.split(":")[0] + (":" + name.split(":")[1] if ":" in name else ""))
    b.set_xlabel("seconds into mixed phase")
    b.set_ylabel("RSS (MiB)")
    b.legend(fontsize=7)
    b.set_title(f"RSS, bound +{result['rss_mib']['bound']:.0f} MiB; shm left: {len(result['shm_segments_after_shutdown'])}")
    plotting.save(fig, path)
