"""Recovery: how long each fault takes the supervised service down, and whether a frame is lost.

    morphocam-bench recovery --model morphocam_hushem --trials 3

One supervised server (``morphocam-serve``'s :class:`~morphocam.serving.supervisor.Supervisor`, in a thread)
on the released classifier and its explainer. Each trial injects one real fault and measures:

- ``classifier_stub``: SIGKILL one classifier stub while the streaming client (``classify_frames``)
  sends ``frames`` frames. Recovered = the supervisor's reload finished (seconds after the kill);
  also the client's longest wait between two consecutive results.
- ``explainer_stub``: SIGKILL the explainer's stub; one explanation request every 0.2 s. Recovered =
  the first explanation answered after the kill.
- ``server``: SIGKILL the whole ``tritonserver`` process group mid-stream. Recovered = the supervisor
  restarted it on the same ports and every model is ready (its first restart waits 0.5 s; kills are
  ``server_spacing_s`` apart so that each trial measures a first crash, not the backoff).

For the streaming faults the client's longest wait between two consecutive results is recorded too
(``longest_gap_s``: what a caller sees; results already computed before the kill still arrive first).

Frames lost = frames sent minus frames answered ``ok`` exactly once and in order (must be 0).
Medians per fault in ``recovery.json`` under ``output_dir`` (a run of some faults updates theirs and
keeps the others'); the machine's CPU and load are recorded per fault.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from morphocam.atomic import atomic_write_text
from morphocam.config import option
from morphocam.contract import INPUT_DTYPE, INPUT_NAME, explain_model_for

FAULTS = ("classifier_stub", "explainer_stub", "server")


@dataclass
class RecoveryConfig:
    model_repository: Path = option("Triton model repository (the command starts its own supervised server)",
                                    Path("model_repository"))
    model: str = option("classifier model name (its explainer is <model>_explain)", "morphocam_hushem")
    images: Path = option("folder of real images to stream", Path("samples/hushem"))
    output_dir: Path = option("results folder", Path("results/benchmarks/recovery"))
    faults: tuple[str, ...] = option(f"faults to inject, of {', '.join(FAULTS)}", FAULTS)
    trials: int = option("trials per fault (the median is reported)", 3)
    frames: int = option("frames streamed per classifier/server trial", 600)
    kill_after: int = option("results received before the fault is injected", 150)
    timeout_s: float = option("seconds to wait for recovery before a trial counts as failed", 180.0)
    server_spacing_s: float = option("seconds between two server kills: the supervisor's restart backoff "
                                     "resets after 60 s up, so closer kills measure the backoff", 65.0)


def _frames(folder: Path, n: int):
    from morphocam.clients.sources import Frame
    from morphocam.preprocess import is_image_path

    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_path(p))
    if not paths:
        raise FileNotFoundError(f"no images under {folder}")
    return [Frame(f"f{i:05d}", str(paths[i % len(paths)])) for i in range(n)]


def _stream_with_fault(url: str, model: str, cfg: RecoveryConfig, kill) -> dict:
    """Stream ``cfg.frames`` frames; ``kill()`` after ``cfg.kill_after`` results; the client's view."""
    from morphocam.clients.streaming import classify_frames

    frames = _frames(cfg.images, cfg.frames)
    arrivals: list[float] = []
    records: list[dict] = []
    killed_at: list[float] = []

    def killer():
        while len(records) < cfg.kill_after:
            time.sleep(0.005)
        killed_at.append(time.time())
        kill()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    for record in classify_frames(frames, [url], model, batch_size=4, max_wait_ms=10, max_in_flight=4,
                                  timeout_s=20, retry_deadline_s=cfg.timeout_s):
        records.append(record)
        arrivals.append(time.time())
    t.join(timeout=10)
    ids = [r["frame_id"] for r in records]
    ok_in_order = ids == [f.id for f in frames]
    return {"frames": len(frames), "answered": len(records), "ok": sum(r["status"] == "ok" for r in records),
            "in_order_exactly_once": ok_in_order,
            "frames_lost": len(frames) - len({r["frame_id"] for r in records if r["status"] == "ok"}),
            "retried_frames": sum(r.get("attempts", 1) > 1 for r in records),
            "killed_at": killed_at[0] if killed_at else None,
            "longest_gap_s": float(np.max(np.diff(arrivals))) if len(arrivals) > 1 else None}


def _classifier_stub(sup, cfg: RecoveryConfig) -> dict:
    from morphocam.serving.processes import python_stubs

    srv = sup.server
    seen = len(sup.events)

    def kill():
        stub = next(s for s in python_stubs(srv.pid) if s.model == cfg.model and s.instance != s.model)
        os.kill(stub.pid, signal.SIGKILL)

    row = _stream_with_fault(srv.grpc_url, cfg.model, cfg, kill)
    reload = next((e for e in sup.events[seen:] if e["kind"] == "model_reload" and e["model"] == cfg.model
                   and e["ok"]), None)
    row["recovery_s"] = reload["time"] - row["killed_at"] if reload and row["killed_at"] else None
    row["reload_s"] = reload["seconds"] if reload else None
    return row


def _explainer_stub(sup, cfg: RecoveryConfig) -> dict:
    import tritonclient.grpc as grpcclient

    from morphocam.contract import InputContract
    from morphocam.preprocess import load_frame
    from morphocam.serving.processes import python_stubs

    srv = sup.server
    explain = explain_model_for(cfg.model)
    contract = InputContract.load(srv.model_repository / cfg.model / "1" / "contract.json")
    pixels = np.stack([load_frame(_frames(cfg.images, 1)[0].payload, contract.height, contract.width)])
    client = grpcclient.InferenceServerClient(srv.grpc_url)

    def explain_once() -> bool:
        inp = grpcclient.InferInput(INPUT_NAME, list(pixels.shape), INPUT_DTYPE)
        inp.set_data_from_numpy(pixels)
        try:
            client.infer(explain, [inp], client_timeout=30)
            return True
        except Exception:  # noqa: BLE001 - the dead stub's error, until the reload
            return False

    try:
        if not explain_once():
            raise RuntimeError(f"{explain} does not answer before the fault")
        stub = next(s for s in python_stubs(srv.pid) if s.model == explain and s.instance != s.model)
        t0 = time.time()
        os.kill(stub.pid, signal.SIGKILL)
        failed = 0
        while time.time() - t0 < cfg.timeout_s:
            if explain_once():
                return {"recovery_s": time.time() - t0, "failed_requests": failed, "frames_lost": 0}
            failed += 1
            time.sleep(0.2)
        return {"recovery_s": None, "failed_requests": failed, "frames_lost": None}
    finally:
        client.close()


def _server(sup, cfg: RecoveryConfig) -> dict:
    srv = sup.server
    ports = (srv.grpc_port, srv.http_port, srv.metrics_port)
    pid = srv.pid
    seen = len(sup.events)
    row = _stream_with_fault(srv.grpc_url, cfg.model, cfg, lambda: os.killpg(pid, signal.SIGKILL))
    restart = next((e for e in sup.events[seen:] if e["kind"] == "server_restart" and e["ok"]), None)
    row["recovery_s"] = restart["time"] - row["killed_at"] if restart and row["killed_at"] else None
    row["restart_s"] = restart["seconds"] if restart else None  # from noticing the exit to ready
    row["same_ports"] = (srv.grpc_port, srv.http_port, srv.metrics_port) == ports
    return row


MEASURE = {"classifier_stub": _classifier_stub, "explainer_stub": _explainer_stub, "server": _server}


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def run(cfg: RecoveryConfig) -> dict:
    from morphocam.benchmarks.variants import ServingVariant, write_variant
    from morphocam.machine import cpu_name
    from morphocam.serving.launcher import TritonServer
    from morphocam.serving.supervisor import Supervisor, SupervisorOptions

    unknown = set(cfg.faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
    scratch = Path(tempfile.mkdtemp(prefix="morphocam-recovery-"))
    repo = write_variant(cfg.model_repository, cfg.model, ServingVariant(), scratch / "repo")
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                    "cpu": cpu_name(), "cores": os.cpu_count(), "load_average_start": os.getloadavg(),
                    "faults": {}}
    said: list[str] = []
    try:
        with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=300,
                          log_file=scratch / "tritonserver.log") as srv, \
                Supervisor(srv, SupervisorOptions(supervisor_metrics_port=-1), say=said.append) as sup:
            for fault in cfg.faults:
                rows = []
                for trial in range(cfg.trials):
                    row = MEASURE[fault](sup, cfg)
                    rows.append(row)
                    print(f"[recovery] {fault:16s} trial {trial + 1}: recovered in {row.get('recovery_s') or float('nan'):.1f} s, "
                          f"frames lost {row.get('frames_lost')}", flush=True)
                    # let the reloaded instances settle; space server kills past the backoff's reset
                    time.sleep(cfg.server_spacing_s if fault == "server" and trial + 1 < cfg.trials else 2)
                result["faults"][fault] = {
                    "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "load_average_after": os.getloadavg(),
                    "median_recovery_s": _median(rows, "recovery_s"),
                    "max_recovery_s": max((r["recovery_s"] for r in rows if r.get("recovery_s") is not None),
                                          default=None),
                    "frames_lost_total": sum(r.get("frames_lost") or 0 for r in rows),
                    "trials": rows}
            result["supervisor_events"] = sup.events
    finally:
        result["load_average_end"] = os.getloadavg()
        result["supervisor_messages"] = [s[:400] for s in said]
        shutil.rmtree(scratch, ignore_errors=True)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    previous = cfg.output_dir / "recovery.json"
    if previous.is_file():  # keep the faults this run did not measure
        kept = json.loads(previous.read_text()).get("faults", {})
        result["faults"] = {**{k: v for k, v in kept.items() if k not in result["faults"]}, **result["faults"]}
    atomic_write_text(cfg.output_dir / "recovery.json", json.dumps(result, indent=2, default=str) + "\n")
    for fault, summary in result["faults"].items():
        print(f"[recovery] {fault:16s} median {summary['median_recovery_s']} s (max {summary['max_recovery_s']}), "
              f"frames lost {summary['frames_lost_total']}")
    return result


def passed(result: dict) -> bool:
    """Every fault recovered in every trial, and no frame was lost."""
    return all(s["frames_lost_total"] == 0 and all(r.get("recovery_s") is not None for r in s["trials"])
               for s in result["faults"].values())
