"""``morphocam-serve``: the real Triton server on ``model_repository/``, loopback by default.

    morphocam-serve [--model-repository DIR] [--host 127.0.0.1] [--grpc-port 8001] [--http-port 8000]
                    [--metrics-port 8002] [--log-verbose 0] [--startup-timeout 300] [--log-dir DIR]
                    [--supervisor-metrics-port 8003] [--no-supervise]
                    [--classifier-engine native|python-ort|openvino] [--backend-sources DIR]
    morphocam-serve --build-backend true [--backend-sources DIR]

The classifiers run on Triton's own ONNX Runtime backend, compiled from Triton's sources on first use
and cached per ONNX Runtime version (``serving/backend_build.py``); where it cannot be built, they fall
back to their Python-backend configs with a warning.

Waits until the server and every model (warm-up included) are ready, prints the endpoints, then
supervises it (:mod:`.supervisor`: a model whose stub died is reloaded, a dead server is restarted
on the same ports, each counted in the supervisor's Prometheus metrics), and on SIGINT/SIGTERM stops
the server cleanly (no stub processes or /dev/shm segments left behind). The server's logs, including
those of servers that died, stay in ``--log-dir``.

A repository exported for the GPU target runs on NGC's container, e.g.
``docker run --gpus all -p 8000-8002:8000-8002 -v $PWD/model_repository_gpu:/models
nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models``, once the explain
models' pip packages are installed in it (README, "Serving"): the model folders carry their own code.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from morphocam.config import parse_config

from morphocam.contract import CLASSIFIER_ENGINES, NATIVE_ENGINE

from .launcher import LOOPBACK_HOSTS, ServerStartError, TritonServer
from .supervisor import Supervisor, SupervisorOptions

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServeConfig(SupervisorOptions):
    model_repository: Path = field(default=PROJECT_ROOT / "model_repository",
                                   metadata={"help": "Triton model repository (written by morphocam-export)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind gRPC, HTTP and metrics to"})
    grpc_port: int = field(default=8001, metadata={"help": "gRPC (KServe v2) port"})
    http_port: int = field(default=8000, metadata={"help": "HTTP (KServe v2) port"})
    metrics_port: int = field(default=8002, metadata={"help": "Prometheus metrics port"})
    log_verbose: int = field(default=0, metadata={"help": "Triton --log-verbose level"})
    startup_timeout: float = field(default=300.0, metadata={"help": "seconds to wait for all models to be ready"})
    grpc_ssl_cert: Optional[Path] = field(default=None, metadata={"help": "PEM server certificate: serve gRPC over "
                                                                  "TLS (with --grpc-ssl-key)"})
    grpc_ssl_key: Optional[Path] = field(default=None, metadata={"help": "PEM private key of --grpc-ssl-cert"})
    allow_failed_models: bool = field(default=False, metadata={"help": "keep serving the models that loaded when "
                                                                "others fail (Triton --exit-on-error=false); a model "
                                                                "whose file fails its .sha256 sidecar is left out"})
    classifier_engine: str = field(default=NATIVE_ENGINE, metadata={
        "help": f"how the classifiers run: {' | '.join(CLASSIFIER_ENGINES)} (native = Triton's ONNX Runtime "
                "backend, built on first use; the others = the Python-backend configs/<engine>.pbtxt)",
        "choices": CLASSIFIER_ENGINES})
    backend_sources: Optional[Path] = field(default=None, metadata={
        "help": "local Triton sources for the native backend build (triton/{core,common,backend,onnxruntime_backend}"
                " + onnxruntime/onnxruntime_c_api.h); default: $MORPHOCAM_TRITON_SOURCES, ../shared/third_party, "
                "else clone the tagged repositories"})
    build_backend: bool = field(default=False, metadata={
        "help": "only build (or rebuild) Triton's ONNX Runtime backend into the cache, print its folder and exit"})
    log_dir: Optional[Path] = field(default=None, metadata={"help": "folder for tritonserver.log and the kept logs "
                                                            "of servers that died (default: a new temp folder)"})


def exposure_warning(host: str, tls: bool) -> str | None:
    """What a non-loopback bind exposes, or None on loopback. With gRPC TLS the warning says what TLS
    does not cover: no client authentication, and HTTP and metrics still in plaintext on the same host."""
    if host in LOOPBACK_HOSTS:
        return None
    if tls:
        return (f"binding to {host}: gRPC is encrypted (TLS) but has no client authentication, and HTTP and "
                f"metrics are plaintext on the same address; anyone who can reach it can run inference. "
                f"Firewall the HTTP and metrics ports or put the server behind an authenticating proxy.")
    return (f"binding to {host}: the server has no authentication or TLS; anyone who can reach this address "
            f"can run inference and read metrics. Use --grpc-ssl-cert/--grpc-ssl-key and put it behind a "
            f"proxy or firewall.")


def build_only(cfg: ServeConfig) -> int:
    """``--build-backend``: compile Triton's ONNX Runtime backend into the cache (always rebuilds)."""
    from .backend_build import ensure_backend
    from .triton_install import TritonInstall, default_cache_root

    try:
        folder = ensure_backend(default_cache_root(), TritonInstall.find().tritonserver_lib, cfg.backend_sources,
                                rebuild=True)
    except ServerStartError as exc:  # BackendBuildError included
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv, "Serve morphocam models with NVIDIA Triton Inference Server (CPU).",
                       prog="morphocam-serve")
    if cfg.build_backend:
        return build_only(cfg)
    warning = exposure_warning(cfg.host, tls=cfg.grpc_ssl_cert is not None)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    repo = Path(cfg.model_repository)
    if not repo.is_dir() or not any(repo.iterdir()):
        print(f"error: model repository {repo} is missing or empty; create it with morphocam-export",
              file=sys.stderr)
        return 2

    if (cfg.grpc_ssl_cert is None) != (cfg.grpc_ssl_key is None):
        print("error: --grpc-ssl-cert and --grpc-ssl-key go together", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(tempfile.mkdtemp(prefix="morphocam-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    server = TritonServer(repo, host=cfg.host, grpc_port=cfg.grpc_port, http_port=cfg.http_port,
                          metrics_port=cfg.metrics_port, log_verbose=cfg.log_verbose,
                          startup_timeout=cfg.startup_timeout, grpc_ssl_cert=cfg.grpc_ssl_cert,
                          grpc_ssl_key=cfg.grpc_ssl_key, require_all_models=not cfg.allow_failed_models,
                          classifier_engine=cfg.classifier_engine, backend_sources=cfg.backend_sources,
                          log_file=log_dir / "tritonserver.log")
    print(f"starting tritonserver on {repo} (log: {server.log_path}) ...", flush=True)
    try:
        server.start()
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        models = ", ".join(f"{m['name']} v{m.get('version', '?')}" for m in server.models())
        for note in server.warnings:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        print(f"ready in {server.startup_seconds:.1f} s ({server.classifier_engine} classifiers): {models}",
              flush=True)
        for name, reason in server.failed_models.items():
            print(f"warning: model {name} failed to load and is not served: {reason}", file=sys.stderr, flush=True)
        print(f"  gRPC    {server.grpc_url}{' (TLS)' if cfg.grpc_ssl_cert else ''}\n  HTTP    http://{server.http_url}\n  metrics {server.metrics_url}",
              flush=True)
        if cfg.supervise:
            supervisor = Supervisor(server, cfg)
            try:
                supervisor.serve_metrics()
            except OSError as exc:
                print(f"error: cannot serve the supervisor's metrics on {cfg.host}:{cfg.supervisor_metrics_port}: "
                      f"{exc} (choose another --supervisor-metrics-port, or -1 for none)", file=sys.stderr)
                return 2
            if supervisor.metrics_url:
                print(f"  supervisor metrics {supervisor.metrics_url}", flush=True)
            print("supervising (reloads dead models, restarts a dead server); press Ctrl-C to stop", flush=True)
            try:
                supervisor.run(stop)  # main thread: a restarted server still dies with us
            finally:
                supervisor.metrics.close()
        else:
            print("press Ctrl-C to stop", flush=True)
        while not stop.is_set():
            if server.process is not None and server.process.poll() is not None:
                print(f"error: tritonserver exited unexpectedly (code {server.process.returncode}); "
                      f"log tail:\n{server.log_tail()}", file=sys.stderr)
                server.stop()
                return 1
            stop.wait(0.5)
        print("stopping ...", flush=True)
    finally:
        code = server.stop()
    print(f"stopped (tritonserver exit code {code})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
