"""Serving benchmark: in-process engines (the ceiling) vs the real Triton server, in one run.

    morphocam-bench serving --model morphocam_smids --images samples/smids

The in-process ceiling (:mod:`.inprocess`) is the fastest engine on the exported ONNX graph at batch
1/8/32, built by the same engine factory and with the same settings as the served model (the JSON
records them under ``inprocess_settings``). The served figures come from :mod:`.load_generator`
against the real server on loopback. The machine's matmul peak (:mod:`.matmul_peak`) bounds both.
JSON + PNG (:mod:`.serving_plot`) in ``output_dir``.

Each ``--classifier-engines`` entry (default: ``native`` = Triton's own ONNX Runtime backend, then
``python-ort`` = the Python-backend model.py running ONNX Runtime) is served on its own server in the
same run, against the same ceiling: ``engines.<name>`` in the JSON; the first engine's rows are also
at the top level.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from morphocam.atomic import atomic_write_text
from morphocam.contract import EXPLAIN_SUFFIX, InputContract
from morphocam.engines import affinity_cores
from morphocam.machine import cpu_name

from .inprocess import ceiling, inprocess, load_images
from .load_generator import add_ratios, explain_latency, fmt, served, streaming_client
from .matmul_peak import gflop_per_image, matmul_peak_gflops
from .procfs import process_table
from .serving_config import ServingBenchConfig
from .serving_plot import plot

__all__ = ["ServingBenchConfig", "run"]


def _machine(contract: InputContract) -> dict:
    """Cores, CPU, matmul peak and the compute bound it implies for this model's input size."""
    gflop = gflop_per_image(contract.height, contract.width)
    peak = matmul_peak_gflops()
    cores = affinity_cores()
    print(f"[machine] {cores} cores, FP32 matmul peak {peak['peak']:.0f} GFLOP/s (numpy {peak['numpy']:.0f}"
          f" with OpenBLAS {peak.get('numpy_openblas_kernels')} kernels, torch {peak.get('torch', 0):.0f}) "
          f"-> compute bound {peak['peak'] / gflop:.0f} img/s at {gflop:.2f} GFLOP/image", flush=True)
    return {"cores": cores, "cpu": cpu_name(), "matmul": peak, "matmul_peak_gflops": peak["peak"],
            "gflop_per_image": gflop, "input": [contract.height, contract.width]}


def _served_rows(cfg: ServingBenchConfig, srv, frames, best: float) -> list[dict]:
    """The load generator at every frames-per-request x concurrency, then through shared memory."""
    pids = list(process_table(srv.process).values())
    points = [(per_request, c, "grpc") for per_request in cfg.request_batches for c in cfg.concurrency]
    if cfg.shared_memory:
        points += [(1, c, "shm") for c in (4, 16)]
    rows = []
    for per_request, c, transport in points:
        row = add_ratios(served(srv.grpc_url, cfg.model, frames, c, per_request, cfg.seconds, transport=transport,
                                server_pids=pids), best)
        rows.append(row)
        how = "shared memory, " if transport == "shm" else ""
        print(f"[served] {how}{per_request:2d} frames/request, {c:3d} in flight: {fmt(row)}", flush=True)
    return rows


def _perf_analyzer(cfg: ServingBenchConfig, srv, contract: InputContract, best: float):
    """Triton's own load generator at 16 in flight, when its binary is available."""
    from . import perf_analyzer

    binary = perf_analyzer.find(cfg.perf_analyzer)
    if binary is None:
        return "not found (see README: perf_analyzer from the tritonclient 2.50.0 wheel)"
    pa = perf_analyzer.run(binary, srv.grpc_url, cfg.model, 16, (contract.height, contract.width, 3),
                           seconds=cfg.seconds)
    pa["ratio_to_ceiling"] = pa["images_per_s"] / best
    print(f"[perf_analyzer] 1 frame/request, 16 in flight: {pa['images_per_s']:7.1f} img/s "
          f"p50 {pa['p50_ms']:.1f} p99 {pa['p99_ms']:.1f} ms, ratio {pa['ratio_to_ceiling']:.2f}", flush=True)
    return pa


def _against_server(cfg: ServingBenchConfig, repository: Path, contract: InputContract, frames, best: float,
                    result: dict) -> None:
    """Start the real server on ``repository`` and add every served measurement to ``result``."""
    from morphocam.serving.launcher import TritonServer

    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0) as srv:
        result["server_startup_s"] = srv.startup_seconds
        result["served"] = _served_rows(cfg, srv, frames, best)
        if cfg.streaming:
            row = add_ratios(streaming_client(srv.grpc_url, cfg.model, frames, cfg.stream_frames), best)
            result["streaming_client"] = row
            print(f"[streaming client] {row['records']} records for {row['frames']} frames: {fmt(row)}", flush=True)
        result["perf_analyzer"] = _perf_analyzer(cfg, srv, contract, best)
        explain_model = f"{cfg.model}{EXPLAIN_SUFFIX}"
        if cfg.explain and (repository / explain_model).is_dir():
            result["explain"] = explain_latency(srv.grpc_url, explain_model, frames)


def run(cfg: ServingBenchConfig) -> dict:
    from .variants import describe, write_variant

    version_dir = cfg.model_repository / cfg.model / "1"
    contract = InputContract.load(version_dir / "contract.json")
    frames = load_images(cfg.images, contract)
    result: dict = {"model": cfg.model, **_machine(contract)}
    settings = cfg.inprocess_settings()
    result["inprocess_settings"] = {k: v for k, v in settings.describe().items() if k not in ("engine", "precision")}
    print(f"[inprocess] settings {result['inprocess_settings']}", flush=True)
    result["inprocess"] = {p.name: inprocess(p, frames, cfg.batches, cfg.inprocess_seconds, settings)
                           for p in sorted(version_dir.glob("*.onnx"))}
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
                result["ceiling_fraction_of_peak"] = best[0] * result["gflop_per_image"] / result["matmul_peak_gflops"]
                result["fastest_inprocess_any_precision"] = ceiling(result["inprocess"], None)
            rows = {"served_config": served_config, "ceiling_images_per_s": best[0], "ceiling": best[1]}
            _against_server(cfg, repository, contract, frames, best[0], rows)
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
