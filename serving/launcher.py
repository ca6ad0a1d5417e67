"""Start and stop the real ``tritonserver`` (2.51) that the ``nvidia-pytriton`` wheel bundles.

The wheel ships the server binary, ``libtritonserver`` and the Python backend, but no ONNX Runtime
backend, so every model here is a Python-backend ``model.py``. What the binary needs on a CPU box
(see ``../shared/NOTES.md``):

- a backend directory holding ``python/`` = ``libtriton_python.so`` + ``triton_python_backend_utils.py``
  + the stub for this interpreter's version (assembled once in a cache folder);
- ``LD_LIBRARY_PATH`` = the wheel's ``nvidia_pytriton.libs`` (libtritonserver, libcudart stubs...)
  followed by this interpreter's ``LIBDIR`` (else the stub picks the system libpython);
- ``PATH`` starting with this environment's ``bin`` (the stub runs ``python3`` to find packages).

:class:`TritonServer` is a context manager: ``with TritonServer(repo, grpc_port=0) as srv: ...``
starts the server, waits until it and every model are ready, and on exit stops it (SIGTERM, then
SIGKILL after a grace period), reaps the backend stub processes and removes the shared-memory
segments the Python backend created under ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SHM_DIR = Path("/dev/shm")


class ServerStartError(RuntimeError):
    """The server did not become ready; the message carries the reason and the log tail."""


class PortInUseError(ServerStartError):
    """A requested port is already bound by another process."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel's pieces live."""

    binary: Path
    python_backend: Path  # folder with libtriton_python.so + triton_python_backend_utils.py
    stub: Path
    libs: Path  # nvidia_pytriton.libs
    caches: Path

    @classmethod
    def find(cls) -> "TritonInstall":
        try:
            import pytriton
        except ImportError as exc:  # pragma: no cover - dependency is pinned
            raise ServerStartError("nvidia-pytriton is not installed: it provides the tritonserver binary "
                                   "(pip install nvidia-pytriton==0.7.0)") from exc
        root = Path(pytriton.__file__).resolve().parent / "tritonserver"
        site = root.parent.parent
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=site / "nvidia_pytriton.libs",
            caches=root / "caches",
        )
        for path in (install.binary, install.python_backend / "libtriton_python.so",
                     install.python_backend / "triton_python_backend_utils.py", install.stub, install.libs):
            if not path.exists():
                raise ServerStartError(f"nvidia-pytriton install is incomplete: {path} is missing "
                                       f"(Python {version} stub needed)")
        return install

    def backend_directory(self, cache_root: Path | None = None) -> Path:
        """A ``--backend-directory`` with ``python/`` assembled from the wheel (symlinks, built once)."""
        cache_root = Path(cache_root or os.environ.get("MORPHOCAM_CACHE", Path.home() / ".cache" / "morphocam"))
        target = cache_root / "triton_backends"
        python_dir = target / "python"
        wanted = {
            "libtriton_python.so": self.python_backend / "libtriton_python.so",
            "triton_python_backend_utils.py": self.python_backend / "triton_python_backend_utils.py",
            "triton_python_backend_stub": self.stub,
        }
        ok = python_dir.is_dir() and all(
            (python_dir / name).is_symlink() and os.readlink(python_dir / name) == str(src)
            for name, src in wanted.items())
        if ok:
            return target
        # Build in a temporary sibling and rename into place, so concurrent starts never see half a folder.
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="triton_backends.", dir=target.parent))
        (staging / "python").mkdir()
        for name, src in wanted.items():
            os.symlink(src, staging / "python" / name)
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:  # another process won the race; its folder is equivalent
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def environment(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        ld = [str(self.libs)] + ([libdir] if libdir else [])
        if env.get("LD_LIBRARY_PATH"):
            ld.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p])
        # Make the project importable from the stub even without an editable install.
        project = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([project] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just told us is free (racy by nature, fine for tests)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (e.g. a killed pytest).

    Linux delivers PR_SET_PDEATHSIG when the forking *thread* exits, so it is only armed for servers
    started from the main thread (see :meth:`TritonServer.start`).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, Linux only
        pass


def cleanup_stale_shm() -> list[Path]:
    """Remove ``morphocam_<pid>_*`` segments whose creating process is gone and nobody maps any more."""
    stale = []
    for path in SHM_DIR.glob("morphocam_*_*"):
        try:
            pid = int(path.name.split("_")[1])
        except (IndexError, ValueError):
            continue
        if not Path(f"/proc/{pid}").exists():
            stale.append(path)
    if not stale:
        return []
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            text = Path(maps).read_text()
        except OSError:
            continue
        mapped.update(p for p in stale if str(p) in text)
    removed = []
    for path in stale:
        if path not in mapped:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _children(pid: int) -> list[int]:
    """Direct and indirect children of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        try:
            fields = text[text.rindex(")") + 2:].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
        except (ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class TritonServer:
    """A real ``tritonserver`` process serving one model repository.

    Ports given as 0 are replaced by free ports. ``log_verbose`` is Triton's ``--log-verbose`` level.
    """

    def __init__(self, model_repository: Path | str, host: str = "127.0.0.1", grpc_port: int = 8001,
                 http_port: int = 8000, metrics_port: int = 8002, log_verbose: int = 0,
                 startup_timeout: float = 180.0, stop_grace: float = 15.0, log_file: Path | str | None = None,
                 extra_args: tuple[str, ...] = (), cache_root: Path | None = None,
                 grpc_ssl_cert: Path | str | None = None, grpc_ssl_key: Path | str | None = None,
                 require_all_models: bool = True):
        """``grpc_ssl_cert``/``grpc_ssl_key`` (PEM files, both or neither) turn on TLS for gRPC (HTTP and
        metrics stay plaintext: keep them on loopback). ``require_all_models=False`` lets the server come
        up when some models fail to load (``--exit-on-error=false``): readiness then waits until every
        model has a final state and at least one is READY; the failures are in :attr:`failed_models`."""
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
        self.shm_prefix = f"morphocam_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._own_log = log_file is None
        self.log_path = Path(log_file) if log_file else Path(tempfile.mkstemp(prefix="tritonserver.", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._install: TritonInstall | None = None

    # ----------------------------------------------------------------- endpoints
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    # ----------------------------------------------------------------- command
    def command(self) -> list[str]:
        install = self._install or TritonInstall.find()
        backends = install.backend_directory(self.cache_root)
        args = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
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
        ]
        if self.grpc_ssl_cert:
            args += ["--grpc-use-ssl=true", f"--grpc-server-cert={self.grpc_ssl_cert}",
                     f"--grpc-server-key={self.grpc_ssl_key}"]
        return args + list(self.extra_args)

    # ----------------------------------------------------------------- lifecycle
    def check_ports(self) -> None:
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
        cleanup_stale_shm()
        env = self._install.environment()
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            # Own session: a terminal's Ctrl-C goes to us, and stop() can signal the whole group.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None)
        try:
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        # Drop the harmless CUDA/NVML noise a CPU box prints so the real reason is visible.
        noise = ("CUDA driver", "pinned memory", "NVML", "DCGM", "cudaGetDevice", "libcuda")
        kept = [ln for ln in text if not any(n in ln for n in noise)]
        return "\n".join(kept[-lines:])

    def _http(self, method: str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}", method=method,
                                     data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
            return 0, b""

    def models(self) -> list[dict]:
        status, body = self._http("POST", "/v2/repository/index")
        return json.loads(body) if status == 200 else []

    def is_ready(self) -> bool:
        return self._http("GET", "/v2/health/ready")[0] == 200

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
            elif not self.require_all_models and self._http("GET", "/v2/health/live")[0] == 200:
                # Some models may have failed: wait for every model to reach a final state.
                models = self.models()
                if models and all(m.get("state") in ("READY", "UNAVAILABLE") for m in models):
                    self.failed_models = {m["name"]: m.get("reason", "") for m in models
                                          if m.get("state") != "READY"}
                    if len(self.failed_models) < len(models):
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
            descendants = _children(proc.pid)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(timeout=self.stop_grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    code = proc.wait(timeout=10)
            else:
                code = proc.returncode
            # Stubs normally exit with the server; anything left in its group or tree is killed.
            leftovers = set(descendants) | set(_children(proc.pid))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.cleanup_shm()
        if self._own_log and code == 0:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return code

    def shm_segments(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def cleanup_shm(self) -> list[Path]:
        removed = []
        for path in self.shm_segments():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
        return removed

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
