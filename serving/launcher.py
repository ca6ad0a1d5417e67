"""The server's lifecycle: start the real ``tritonserver``, wait until every model is ready, stop it cleanly.

:class:`TritonServer` is a context manager: ``with TritonServer(repo, grpc_port=0) as srv: ...``
starts the server, waits until it and every model are ready, and on exit stops it (SIGTERM, then
SIGKILL after a grace period), reaps the backend stub processes and removes the shared-memory
segments the Python backend created under ``/dev/shm``.

The pieces it composes live in their own modules: :mod:`.triton_install` (the wheel's binary,
backend and environment), :mod:`.ports`, :mod:`.processes` (the stub process tree), :mod:`.shm`,
:mod:`.health` (liveness, readiness, model index over HTTP) and :mod:`.errors`. The names other code imports from here are re-exported below.
"""

from __future__ import annotations

import shutil
import signal
import sys
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from morphocam.contract import CLASSIFIER_ENGINES, NATIVE_ENGINE, PYTHON_ENGINES

from . import backend_build, integrity, processes, shm
from .errors import PortInUseError, ServerStartError
from .health import HealthProbe
from .ports import LOOPBACK_HOSTS, client_host, free_port, port_is_free
from .triton_install import TritonInstall, default_cache_root

__all__ = ["TritonServer", "TritonInstall", "ServerStartError", "PortInUseError", "LOOPBACK_HOSTS", "free_port",
           "port_is_free"]

# Harmless lines a CPU box prints (no CUDA driver, NVML, DCGM); hidden from the log tail so the real reason shows.
LOG_NOISE = ("CUDA driver", "pinned memory", "NVML", "DCGM", "cudaGetDevice", "libcuda")


class TritonServer:
    """A real ``tritonserver`` process serving one model repository.

    Ports given as 0 are replaced by free ports. ``log_verbose`` is Triton's ``--log-verbose`` level.
    """

    def __init__(self, model_repository: Path | str, host: str = "127.0.0.1", grpc_port: int = 8001,
                 http_port: int = 8000, metrics_port: int = 8002, log_verbose: int = 0,
                 startup_timeout: float = 180.0, stop_grace: float = 15.0, log_file: Path | str | None = None,
                 extra_args: tuple[str, ...] = (), cache_root: Path | None = None,
                 grpc_ssl_cert: Path | str | None = None, grpc_ssl_key: Path | str | None = None,
                 require_all_models: bool = True, stub_python: Path | str | None = None,
                 cwd: Path | str | None = None, classifier_engine: str = NATIVE_ENGINE,
                 backend_sources: Path | str | None = None, fallback: bool = True,
                 model_control: str = "explicit"):
        """``grpc_ssl_cert``/``grpc_ssl_key`` (PEM files, both or neither) turn on TLS for gRPC (HTTP and
        metrics stay plaintext: keep them on loopback). ``require_all_models=False`` lets the server come
        up when some models fail to load (``--exit-on-error=false``): readiness then waits until every
        model has a final state and at least one is READY; the failures are in :attr:`failed_models`.
        ``stub_python`` is the ``python3`` of the environment the Python-backend stubs run in (same minor
        version as this one; default: this interpreter's), ``cwd`` the server's working directory, which
        the stubs put on ``sys.path`` (default: ours). ``model_control="explicit"`` (the default) loads every
        model at start (``--load-model=*``) and lets the repository API load and unload them, which is how
        :mod:`.supervisor` brings back a model whose stub died; ``"none"`` is Triton's own default (the
        repository API refuses).

        ``classifier_engine``: ``native`` serves each model's ``config.pbtxt`` (Triton's ONNX Runtime
        backend for the classifiers, built on first use and cached: :mod:`.backend_build`, from
        ``backend_sources`` or the default sources); ``python-ort``/``openvino`` serve the classifiers'
        Python-backend ``configs/<engine>.pbtxt`` instead. With ``fallback`` a native backend that cannot
        be built falls back to ``python-ort`` (reason in :attr:`warnings`). Before starting, every model
        file is checked against its ``.sha256`` sidecar (:mod:`.integrity`): a mismatch refuses the start,
        or with ``require_all_models=False`` leaves that model out (reason in :attr:`failed_models`)."""
        if classifier_engine not in CLASSIFIER_ENGINES:
            raise ValueError(f"classifier_engine must be one of {CLASSIFIER_ENGINES}, got {classifier_engine!r}")
        if model_control not in ("explicit", "none"):
            raise ValueError(f"model_control must be 'explicit' or 'none', got {model_control!r}")
        self.model_control = model_control
        if (grpc_ssl_cert is None) != (grpc_ssl_key is None):
            raise ValueError("give both grpc_ssl_cert and grpc_ssl_key (PEM files) for gRPC TLS, or neither")
        self.grpc_ssl_cert = Path(grpc_ssl_cert).resolve() if grpc_ssl_cert else None
        self.grpc_ssl_key = Path(grpc_ssl_key).resolve() if grpc_ssl_key else None
        self.require_all_models = require_all_models
        self.failed_models: dict[str, str] = {}
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log_verbose = log_verbose
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.extra_args = tuple(extra_args)
        self.cache_root = cache_root
        self.stub_python = Path(stub_python) if stub_python else None
        self.cwd = Path(cwd) if cwd else None
        self.shm_prefix = shm.new_prefix()
        self._own_log = log_file is None
        self.log_path = Path(log_file) if log_file else Path(tempfile.mkstemp(prefix="tritonserver.", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._install: TritonInstall | None = None
        self.classifier_engine = classifier_engine
        self.backend_sources = Path(backend_sources) if backend_sources else None
        self.fallback = fallback
        self.warnings: list[str] = []
        self._native: dict[str, Path] = {}  # {backend name: built folder} linked into the backend directory
        self._refused: dict[str, str] = {}  # models left out before the start (integrity)
        self._served_repository: Path | None = None  # a filtered copy (links) when models were left out

    # ----------------------------------------------------------------- endpoints
    @property
    def grpc_url(self) -> str:
        return f"{client_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{client_host(self.host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{client_host(self.host)}:{self.metrics_port}/metrics"

    # ----------------------------------------------------------------- command
    def command(self) -> list[str]:
        install = self._install or TritonInstall.find()
        backends = install.backend_directory(self.cache_root, self._native)
        args = [
            str(install.binary),
            f"--model-repository={self._served_repository or self.model_repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={install.caches}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            "--strict-readiness=true", f"--exit-on-error={'true' if self.require_all_models else 'false'}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            # Room for a full 32-frame 224x224 batch without growing the region on the hot path.
            "--backend-config=python,shm-default-byte-size=33554432",
            "--backend-config=python,shm-growth-byte-size=16777216",
            f"--exit-timeout-secs={max(int(self.stop_grace) - 2, 1)}",
            f"--model-control-mode={self.model_control}",
        ]
        if self.classifier_engine != NATIVE_ENGINE:
            # configs/<engine>.pbtxt where a model has one (the classifiers), config.pbtxt elsewhere
            args.append(f"--model-config-name={self.classifier_engine}")
        if self.model_control == "explicit":
            args.append("--load-model=*")
        if self.grpc_ssl_cert:
            args += ["--grpc-use-ssl=true", f"--grpc-server-cert={self.grpc_ssl_cert}",
                     f"--grpc-server-key={self.grpc_ssl_key}"]
        return args + list(self.extra_args)

    # ----------------------------------------------------------------- lifecycle
    def check_ports(self) -> None:
        """Refuse ports another process holds (TIME-WAIT leftovers of a stopped server do not count)."""
        for name, port in (("gRPC", self.grpc_port), ("HTTP", self.http_port), ("metrics", self.metrics_port)):
            if not port_is_free(self.host, port):
                raise PortInUseError(
                    f"{name} port {self.host}:{port} is already in use by another process; stop it or choose "
                    f"another port (--{name.lower() if name != 'gRPC' else 'grpc'}-port)")
        if len({self.grpc_port, self.http_port, self.metrics_port}) != 3:
            raise PortInUseError(f"gRPC, HTTP and metrics ports must differ, got "
                                 f"{self.grpc_port}, {self.http_port}, {self.metrics_port}")

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServerStartError("server already started")
        if not self.model_repository.is_dir():
            raise ServerStartError(f"model repository {self.model_repository} does not exist "
                                   "(create it with morphocam-export)")
        for pem in (self.grpc_ssl_cert, self.grpc_ssl_key):
            if pem is not None and not pem.is_file():
                raise ServerStartError(f"gRPC TLS file {pem} does not exist")
        self._install = TritonInstall.find()
        self.check_ports()
        self._verify_models()
        if self.classifier_engine == NATIVE_ENGINE:
            self._prepare_native_backend()
        shm.cleanup_stale()
        env = self._install.environment(stub_python=self.stub_python)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            # Own session: a terminal's Ctrl-C goes to us, and stop() can signal the whole group.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=self.cwd, start_new_session=True,
                                            preexec_fn=processes.die_with_parent
                                            if threading.current_thread() is threading.main_thread() else None)
        try:
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _verify_models(self) -> None:
        """Refuse (or, when some models may fail, leave out) every model whose files fail their sidecar."""
        self._refused = integrity.verify_repository(self.model_repository)
        if not self._refused:
            return
        reasons = "; ".join(f"{m}: {r}" for m, r in self._refused.items())
        if self.require_all_models or len(self._refused) == len(integrity.model_folders(self.model_repository)):
            raise ServerStartError(f"model integrity check failed, not starting: {reasons}")
        self.warnings.append(f"left out (integrity check failed): {reasons}")
        self._served_repository = integrity.without_models(self.model_repository, set(self._refused))

    def _prepare_native_backend(self) -> None:
        """Build (once, cached) Triton's ONNX Runtime backend when a served model needs it; if it cannot be
        built, fall back to the Python-backend configs when every such model has one."""
        repo = self._served_repository or self.model_repository
        needed = backend_build.native_models(repo)
        if not needed:
            return
        cache = Path(self.cache_root or default_cache_root())
        try:
            folder = backend_build.ensure_backend(cache, self._install.tritonserver_lib, self.backend_sources,
                                                  log=lambda msg: print(f"[onnxruntime backend] {msg}",
                                                                        file=sys.stderr, flush=True))
        except backend_build.BackendBuildError as exc:
            fallback = PYTHON_ENGINES[0]
            missing = [m for m in needed if not (repo / m / "configs" / f"{fallback}.pbtxt").is_file()]
            if not self.fallback or missing:
                raise ServerStartError(f"Triton's ONNX Runtime backend is needed by {', '.join(needed)} and cannot "
                                       f"be built: {exc}") from exc
            self.warnings.append(f"Triton's ONNX Runtime backend cannot be built ({exc}); serving the classifiers "
                                 f"with the Python backend (configs/{fallback}.pbtxt) instead")
            self.classifier_engine = fallback
            return
        self._native = {"onnxruntime": folder}

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        kept = [ln for ln in text if not any(n in ln for n in LOG_NOISE)]
        return "\n".join(kept[-lines:])

    @property
    def health(self) -> HealthProbe:
        return HealthProbe(self.http_url)

    def models(self) -> list[dict]:
        return self.health.models()

    def is_ready(self) -> bool:
        return self.health.is_ready()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll() if self.process else -1
            if code is not None:
                raise ServerStartError(f"tritonserver exited with code {code} before becoming ready; "
                                       f"log ({self.log_path}):\n{self.log_tail()}")
            if self.require_all_models and self.is_ready():
                # --strict-readiness: ready means every model loaded; check the index for the record.
                models = self.models()
                not_ready = [m for m in models if m.get("state") != "READY"]
                if models and not not_ready:
                    return
            elif not self.require_all_models and self.health.is_live():
                # Some models may have failed: wait for every model to reach a final state.
                models = self.models()
                if models and all(m.get("state") in ("READY", "UNAVAILABLE") for m in models):
                    failed = {m["name"]: m.get("reason", "") for m in models if m.get("state") != "READY"}
                    self.failed_models = {**self._refused, **failed}  # left out before the start, then by Triton
                    if len(failed) < len(models):
                        return
                    raise ServerStartError(f"no model loaded: {self.failed_models}; "
                                           f"log ({self.log_path}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"tritonserver not ready after {timeout:.0f} s; "
                                       f"log ({self.log_path}):\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> int | None:
        """SIGTERM, wait ``stop_grace`` seconds, then SIGKILL the group; reap stubs; remove shm segments."""
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            # Walk the tree before the server goes: once it dies its stubs are re-parented and lost to us.
            stubs = processes.descendants(proc.pid)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(timeout=self.stop_grace)
                except subprocess.TimeoutExpired:
                    processes.kill_tree(proc.pid)
                    code = proc.wait(timeout=10)
            else:
                code = proc.returncode
            # Stubs normally exit with the server; anything left in its group or tree is killed.
            processes.kill_tree(proc.pid, set(stubs) | set(processes.descendants(proc.pid)))
        self.cleanup_shm()
        if self._served_repository is not None:
            shutil.rmtree(self._served_repository, ignore_errors=True)  # links only
            self._served_repository = None
        if self._own_log and code == 0:
            self.log_path.unlink(missing_ok=True)
        return code

    def shm_segments(self) -> list[Path]:
        return shm.segments(self.shm_prefix)

    def cleanup_shm(self) -> list[Path]:
        return shm.remove(self.shm_segments())

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
