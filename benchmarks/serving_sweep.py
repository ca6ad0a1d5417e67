"""Serving sweep: the released classifier under a grid of engine x instances x threads x queue delay
(engines: Triton's own ONNX Runtime backend ``native`` and the Python-backend engines).

    morphocam-bench sweep --model morphocam_smids --images samples/smids

Each point serves a variant of the released model (:mod:`morphocam.benchmarks.variants`) on the real server,
keeps 1-frame requests in flight at each concurrency with the stock tritonclient, and records
images/s, p50/p99, the server-side batch size, requests slower than 400 ms (Triton 2.51's
dynamic-batcher stall shows up there as ~500 ms), and the CPU used by the server and by the
client. The in-process ceilings (best engine at batch 8, per precision: a bf16 point is compared
with in-process bf16) are measured in the same run, so the ratios hold on the machine that ran it.
JSON + PNG in ``output_dir``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from morphocam import plotting
from morphocam.atomic import atomic_write_text
from morphocam.config import option
from morphocam.engines import EngineSettings, affinity_cores
from morphocam.export.engines import openvino_bf16_supported
from morphocam.machine import cpu_name
from morphocam.contract import NATIVE_ENGINE, InputContract

from .procfs import process_table
from .inprocess import ceiling, inprocess, load_images
from .load_generator import add_ratios, served
from .variants import ServingVariant, write_variant


@dataclass
class SweepConfig:
    model_repository: Path = option("Triton model repository", Path("model_repository"))
    model: str = option("classifier model name", "morphocam_smids")
    images: Path = option("folder of real images to send", Path("samples/smids"))
    output_dir: Path = option("results folder", Path("results/benchmarks/serving_sweep"))
    engines: tuple[str, ...] = option("engine:precision pairs: native:fp32 (Triton's ONNX Runtime backend), "
                                      "onnxruntime:fp32 / openvino:fp32|bf16 (Python backend)",
                                      ("native:fp32", "onnxruntime:fp32", "openvino:bf16"))
    queue_policy: bool = option("keep the config's max_queue_size/timeout (false: Triton's prefetching batcher)", True)
    layouts: tuple[str, ...] = option("instances x threads per instance", ("1x2", "2x1", "2x2"))
    delays_us: tuple[int, ...] = option("dynamic-batching queue delays (microseconds)", (1000, 2000, 5000))
    concurrency: tuple[int, ...] = option("requests in flight", (4, 16))
    frames_per_request: int = option("frames per request", 1)
    seconds: float = option("seconds per measurement", 5.0)
    inprocess_seconds: float = option("seconds per in-process ceiling measurement", 3.0)


def _points(cfg: SweepConfig) -> list[ServingVariant]:
    points = []
    for pair in cfg.engines:
        engine, _, precision = pair.partition(":")
        if precision == "bf16" and not openvino_bf16_supported():
            print(f"[sweep] {pair} skipped: this CPU has no native BF16")
            continue
        for layout in cfg.layouts:
            instances, _, threads = layout.partition("x")
            for delay in cfg.delays_us:
                policy = None if cfg.queue_policy else False
                if engine == NATIVE_ENGINE:
                    points.append(ServingVariant(None, None, int(instances), int(threads), int(delay),
                                                 classifier_engine=NATIVE_ENGINE, queue_policy=policy))
                else:
                    points.append(ServingVariant(engine, precision or "fp32", int(instances), int(threads), int(delay),
                                                 queue_policy=policy))
    return points


def run(cfg: SweepConfig) -> dict:
    from morphocam.serving.launcher import TritonServer

    version_dir = cfg.model_repository / cfg.model / "1"
    frames = load_images(cfg.images, InputContract.load(version_dir / "contract.json"))
    rows = {"model.onnx": inprocess(version_dir / "model.onnx", frames, (8,), cfg.inprocess_seconds)}
    ceilings = {prec: ceiling(rows, prec) for prec in ("fp32", "bf16")
                if any(e.endswith(prec) for e in rows["model.onnx"])}
    settings = EngineSettings().describe()  # the ceiling is built with the served engine settings
    result: dict = {"model": cfg.model, "cores": affinity_cores(), "cpu": cpu_name(),
                    "inprocess_settings": {k: settings[k] for k in ("threads", "spinning", "execution_mode")},
                    "frames_per_request":
                    cfg.frames_per_request, "inprocess_batch8": rows["model.onnx"],
                    "ceilings": {p: {"images_per_s": v, "engine": n} for p, (v, n) in ceilings.items()},
                    "points": []}
    scratch = Path(tempfile.mkdtemp(prefix="morphocam-sweep-"))
    try:
        for variant in _points(cfg):
            repo = write_variant(cfg.model_repository, cfg.model, variant, scratch / "repo")
            with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0) as srv:
                pids = list(process_table(srv.process).values())
                for c in cfg.concurrency:
                    row = add_ratios(served(srv.grpc_url, cfg.model, frames, c, cfg.frames_per_request,
                                            cfg.seconds, server_pids=pids), ceilings[variant.precision or "fp32"][0])
                    row.update(engine=variant.engine or variant.classifier_engine, precision=variant.precision or "fp32",
                               instances=variant.instances,
                               threads=variant.threads, queue_delay_us=variant.queue_delay_us,
                               label=variant.label())
                    result["points"].append(row)
                    print(f"[sweep] {variant.label():42s} {c:3d} in flight: {row['images_per_s']:6.1f} img/s "
                          f"p99 {row['p99_ms']:6.1f} ms, batch {row['avg_server_batch'] or 0:4.1f}, "
                          f">400 ms {row['requests_over_400ms']}, ratio {row['ratio_to_ceiling']:.2f}, "
                          f"server CPU {100 * (row['server_cpu_share'] or 0):.0f}%", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output_dir / "sweep.json", json.dumps(result, indent=2) + "\n")
    plot(result, cfg.output_dir / "sweep.png")
    return result


def plot(result: dict, path: Path) -> None:
    labels = list(dict.fromkeys(p["label"] for p in result["points"]))
    concurrency = sorted({p["concurrency"] for p in result["points"]})
    fig, (a1, a2) = plotting.subplots(2, 1, figsize=(11, 7), sharex=True)
    width = 0.8 / max(1, len(concurrency))
    for k, c in enumerate(concurrency):
        rows = {p["label"]: p for p in result["points"] if p["concurrency"] == c}
        xs = [i + k * width for i in range(len(labels))]
        a1.bar(xs, [rows[lb]["images_per_s"] if lb in rows else 0 for lb in labels], width, label=f"{c} in flight")
        a2.bar(xs, [rows[lb]["p99_ms"] or 0 if lb in rows else 0 for lb in labels], width, label=f"{c} in flight")
    for (prec, c), style in zip(sorted(result["ceilings"].items()), ("--", ":")):
        a1.axhline(c["images_per_s"], color="k", ls=style, label=f"in-process {prec} ceiling ({c['engine']})")
    a1.set_ylabel("images/s")
    a2.set_ylabel("p99 latency (ms)")
    a2.set_yscale("log")
    a2.set_xticks([i + width * (len(concurrency) - 1) / 2 for i in range(len(labels))])
    a2.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    for ax in (a1, a2):
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']}: {result['frames_per_request']}-frame requests on {result['cores']} cores "
                 "(client on the same cores)")
    plotting.save(fig, path)
