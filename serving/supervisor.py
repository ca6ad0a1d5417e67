"""Keep a started server serving: reload a model that died, restart a server that died, count both.

Triton 2.51 does not heal itself: a Python-backend stub that dies (OOM, a native crash, a kill) is never
restarted, and its model answers every request with "Stub process ... is not healthy" while the model
index still says READY. :class:`Supervisor` watches what :class:`~morphocam.serving.launcher.TritonServer`
started, once per ``check_interval_s``:

- **the server process**: when it exits (or stops answering liveness for ``hang_timeout_s``), its log
  is kept beside the live one as ``tritonserver.<time>.exit<code>.<n>.log`` with its tail printed, leftovers
  (stubs, shared memory) are cleaned, and it is started again on the same ports, waiting
  ``restart_backoff`` between failed attempts. A restarted server comes up with the models that load
  (``--exit-on-error=false``): a model that broke meanwhile is then handled like any other model.
- **every model's state** in the repository index (any backend: a native ONNX Runtime model has no stub),
  and **the stubs' processes** of Python-backend models (:func:`.processes.python_stubs`), because a
  dead stub does not change the state. A model that is not READY, or whose stub died, is reloaded
  through the repository API (``tritonclient``'s ``load_model``; the server runs
  ``--model-control-mode=explicit``). A reload that fails is retried after ``reload_backoff`` seconds,
  doubling up to ``reload_backoff_max_s``, with the server's reason printed each time: a broken model
  is never retried in a tight loop, and the other models keep serving meanwhile.

Every restart and reload is printed and counted in Prometheus metrics served by the supervisor on
its own port (``morphocam_supervisor_*`` at ``http://<host>:<metrics_port>/metrics``; Triton's metrics
port stays Triton's). :attr:`Supervisor.events` keeps the same history in memory (tests, benchmarks).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from morphocam.config import option

from . import processes
from .errors import ServerStartError
from .launcher import TritonServer


@dataclass
class SupervisorOptions:
    """How ``morphocam-serve`` supervises its server (part of :class:`~morphocam.serving.cli.ServeConfig`)."""

    supervise: bool = option("reload dead models and restart a dead server (off: exit when the server dies)",
                             True, switch=True)
    check_interval_s: float = option("seconds between two checks of the server, its models and their stubs", 0.5)
    reload_backoff_s: float = option("first wait before retrying a model that failed to reload (doubles)", 2.0)
    reload_backoff_max_s: float = option("longest wait between two reloads of a model that keeps failing", 120.0)
    restart_backoff_s: float = option("first wait before restarting a dead server (doubles per failed start)", 0.5)
    restart_backoff_max_s: float = option("longest wait between two server start attempts", 60.0)
    hang_timeout_s: float = option("restart a server whose liveness endpoint has not answered for this long", 60.0)
    load_timeout_s: float = option("seconds one model load may take before it counts as failed", 300.0)
    supervisor_metrics_port: int = option("port of the supervisor's Prometheus metrics (0: a free port, "
                                          "-1: off)", 8003)


STABLE_S = 60.0  # a server or model that stays up this long starts its backoff afresh


class Backoff:
    """Exponential backoff for one thing: ``ready()`` says whether to try now; ``failed()`` books an
    attempt that did not last (failed, or had to be repeated soon after)."""

    def __init__(self, initial: float, cap: float):
        self.initial, self.cap = initial, cap
        self.failures = 0
        self.next_at = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float) -> float:
        """Book a failure; returns the wait before the next try."""
        wait = min(self.initial * 2 ** self.failures, self.cap)
        self.failures += 1
        self.next_at = now + wait
        return wait

    def reset(self) -> None:
        self.failures, self.next_at = 0, 0.0


class SupervisorMetrics:
    """The supervisor's Prometheus counters, in a registry of their own (several supervisors per process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.server_restarts = Counter("morphocam_supervisor_server_restarts", "tritonserver restarts after it "
                                       "exited or hung", ["outcome"], registry=self.registry)
        self.server_exits = Counter("morphocam_supervisor_server_exits", "unexpected tritonserver exits",
                                    ["code"], registry=self.registry)
        self.model_reloads = Counter("morphocam_supervisor_model_reloads", "model reloads through the repository "
                                     "API", ["model", "cause", "outcome"], registry=self.registry)
        self.stub_deaths = Counter("morphocam_supervisor_stub_deaths", "Python-backend stub processes found dead",
                                   ["model"], registry=self.registry)
        self.model_ready = Gauge("morphocam_supervisor_model_ready", "1 when the model is READY and its stubs "
                                 "run", ["model"], registry=self.registry)
        self.server_up = Gauge("morphocam_supervisor_server_up", "1 while tritonserver runs and is live",
                               registry=self.registry)
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port); returns the port."""
        from prometheus_client import start_http_server

        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def value(self, name: str, **labels) -> float:
        """A sample's current value (0 when never set): ``value("morphocam_supervisor_server_restarts_total",
        outcome="ok")``."""
        return self.registry.get_sample_value(name, labels) or 0.0


class Supervisor:
    """Watch ``server`` (already started) until :meth:`close`; run in a thread (context manager) or call
    :meth:`run` from the main thread, as ``morphocam-serve`` does, so a restarted server still dies
    with its launcher."""

    def __init__(self, server: TritonServer, options: SupervisorOptions | None = None,
                 say: Callable[[str], None] | None = None):
        self.server = server
        self.opt = options or SupervisorOptions()
        self.metrics = SupervisorMetrics()
        self.metrics_port: int | None = None
        self.events: list[dict] = []
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff: dict[str, Backoff] = {}
        self._last_reload: dict[str, float] = {}  # model -> when its last reload succeeded
        self._stubs: dict[tuple[str, str], processes.Stub] = {}  # (model, instance) -> its running stub
        self._unhealthy_since: dict[str, tuple[float, str]] = {}  # model -> (first seen, cause)
        self._restart = Backoff(self.opt.restart_backoff_s, self.opt.restart_backoff_max_s)
        self._not_live_since: float | None = None
        self._up_since = time.monotonic()
        self._exits = 0
        self._generation = 0

    # ---------------------------------------------------------------- bookkeeping
    def _event(self, kind: str, **fields) -> dict:
        event = {"time": time.time(), "kind": kind, **fields}
        self.events.append(event)
        return event

    def _model_backoff(self, model: str) -> Backoff:
        return self._backoff.setdefault(model, Backoff(self.opt.reload_backoff_s, self.opt.reload_backoff_max_s))

    # ---------------------------------------------------------------- lifecycle
    def serve_metrics(self) -> int | None:
        """Start the metrics endpoint (unless the port is -1); returns its port."""
        if self.opt.supervisor_metrics_port >= 0 and self.metrics_port is None:
            self.metrics_port = self.metrics.serve(self.server.host, self.opt.supervisor_metrics_port)
        return self.metrics_port

    @property
    def metrics_url(self) -> str | None:
        from .ports import client_host

        return f"http://{client_host(self.server.host)}:{self.metrics_port}/metrics" if self.metrics_port else None

    def start(self) -> "Supervisor":
        """Serve the metrics and watch the server from a thread of our own."""
        self.serve_metrics()
        self._thread = threading.Thread(target=self.run, name="morphocam-supervisor", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.server.startup_timeout + 30)
            self._thread = None
        self.metrics.close()

    def __enter__(self) -> "Supervisor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, stop: threading.Event | None = None) -> None:
        """Check every ``check_interval_s`` until ``stop`` (or :meth:`close`) is set."""
        stop = stop or self._stop
        self._snapshot_stubs()
        while not (stop.is_set() or self._stop.is_set()):
            try:
                self.check_once(stop)
            except Exception as exc:  # noqa: BLE001 - the supervisor must outlive its own surprises
                self._say(f"supervisor: check failed ({type(exc).__name__}: {exc}); trying again")
            stop.wait(self.opt.check_interval_s)

    # ---------------------------------------------------------------- one round
    def check_once(self, stop: threading.Event | None = None) -> None:
        if self._server_needs_restart():
            self._restart_server(stop or self._stop)
            return
        self._check_models()

    # ---------------------------------------------------------------- the server
    def _server_needs_restart(self) -> bool:
        proc = self.server.process
        if proc is None or proc.poll() is not None:
            self.metrics.server_up.set(0)
            return True
        now = time.monotonic()
        if self.server.health.is_live():
            self._not_live_since = None
            self.metrics.server_up.set(1)
            if self._restart.failures and now - self._up_since > STABLE_S:
                self._restart.reset()  # up for a minute: the next crash starts the backoff afresh
            return False
        self.metrics.server_up.set(0)
        self._not_live_since = self._not_live_since or now
        return now - self._not_live_since > self.opt.hang_timeout_s

    def _keep_log(self, code, what: str = "exited unexpectedly") -> Path | None:
        """Rename the dead server's log so the next start writes a fresh one; print its tail."""
        self._exits += 1
        log = self.server.log_path
        tail = self.server.log_tail(30)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = log.with_name(f"{log.stem}.{stamp}.exit{code}.{self._exits}{log.suffix}")
        try:
            log.rename(kept)
        except OSError:
            kept = None
        self._say(f"supervisor: tritonserver {what} (code {code}); log kept at {kept or log}; "
                  f"last lines:\n{tail}")
        return kept

    def _restart_server(self, stop: threading.Event) -> None:
        t0 = time.monotonic()
        proc = self.server.process
        if proc is not None and proc.poll() is None:
            self._say(f"supervisor: tritonserver (pid {proc.pid}) has not answered liveness for "
                      f"{self.opt.hang_timeout_s:.0f} s; killing it")
            processes.kill_tree(proc.pid)
            proc.wait(timeout=30)
        code = proc.returncode if proc is not None else None
        kept = self._keep_log(code)  # first: stop() deletes a log of its own after a clean exit
        self.server.stop()  # reaps it, kills orphaned stubs, removes its shared memory
        self.metrics.server_exits.labels(code=str(code)).inc()
        self._event("server_exit", code=code, log=str(kept) if kept else None)
        # Degraded beats down: a model that broke meanwhile must not keep the others from serving.
        self.server.require_all_models = False
        self._not_live_since = None
        wait = self._restart.failed(time.monotonic())  # a server that keeps dying is restarted ever slower
        self._say(f"supervisor: restarting tritonserver in {wait:.1f} s")
        while not stop.is_set():
            wait = max(0.0, self._restart.next_at - time.monotonic())
            if stop.wait(wait):
                return
            try:
                self.server.start()
            except ServerStartError as exc:
                wait = self._restart.failed(time.monotonic())
                self.metrics.server_restarts.labels(outcome="failed").inc()
                self._event("server_restart", ok=False, error=str(exc)[:2000])
                failed_log = self._keep_log("start-failed", "did not come back")
                self._say(f"supervisor: restart failed ({str(exc).splitlines()[0]}); next try in {wait:.1f} s"
                          f" (log {failed_log})")
                continue
            took = time.monotonic() - t0
            self._up_since = time.monotonic()
            self.metrics.server_restarts.labels(outcome="ok").inc()
            self.metrics.server_up.set(1)
            self._event("server_restart", ok=True, seconds=took, failed_models=dict(self.server.failed_models))
            self._say(f"supervisor: tritonserver restarted on the same ports (gRPC {self.server.grpc_port}) in "
                      f"{took:.1f} s")
            for name, reason in self.server.failed_models.items():
                self._say(f"supervisor: model {name} did not load after the restart: {reason}")
            self._stubs.clear()
            self._unhealthy_since.clear()
            self._snapshot_stubs()
            return

    # ---------------------------------------------------------------- the models
    def _newest_stubs(self) -> dict[tuple[str, str], processes.Stub]:
        """The newest running stub of each (model, instance). The short-lived stub the Python backend
        starts per model to complete its config (instance name = model name) is not an instance."""
        newest: dict[tuple[str, str], processes.Stub] = {}
        for stub in processes.python_stubs(self.server.pid):  # newest first
            if stub.instance != stub.model:
                newest.setdefault((stub.model, stub.instance), stub)
        return newest

    def _configured_instances(self, model: str) -> list[str]:
        """The instance names a Python-backend model should have running (none for other backends)."""
        status, body = self.server.health.request("GET", f"/v2/models/{model}/config")
        config = json.loads(body) if status == 200 else {}
        if config.get("backend") != "python":
            return []
        return [f"{group['name']}_{i}" for group in config.get("instance_group", [])
                for i in range(int(group.get("count", 1)))]

    def _snapshot_stubs(self, models: set[str] | None = None) -> None:
        """Remember the newest running stub of each instance (of ``models``, default all). A configured
        instance with no stub running at all is remembered as a dead one (pid -1): a stub that dies
        during a reload is noticed too."""
        if self.server.pid is None:
            return
        for key in [k for k in self._stubs if models is None or k[0] in models]:
            del self._stubs[key]
        newest = self._newest_stubs()
        names = models if models is not None else {m["name"] for m in self.server.models()}
        for model in names:
            for instance in self._configured_instances(model):
                self._stubs[(model, instance)] = newest.get((model, instance), processes.Stub(model, instance, -1, 0.0))

    def _dead_stubs(self) -> dict[str, list[str]]:
        """Model -> instances whose remembered stub is gone with no newer one in its place.

        While a model reloads, the old copy's stubs run beside the new ones for a few seconds; a stub
        that started after the remembered one replaces it (a reload, ours or an operator's), an older
        one never does, so a killed stub is noticed even while its predecessor is still exiting.
        """
        newest = self._newest_stubs()
        alive = {s.pid for s in processes.python_stubs(self.server.pid)}
        dead: dict[str, list[str]] = {}
        for key, known in list(self._stubs.items()):
            latest = newest.get(key)
            if latest is not None and latest.started > known.started:
                self._stubs[key] = latest  # reloaded: follow the new stub
            elif known.pid not in alive:
                dead.setdefault(key[0], []).append(f"{key[1]} (pid {known.pid})")
        return dead

    def _check_models(self) -> None:
        index = self.server.models()
        if not index:
            return  # no answer this round: the server check decides whether it is gone
        dead = self._dead_stubs()
        now = time.monotonic()
        for entry in index:
            name, state = entry["name"], entry.get("state", "")
            if state in ("LOADING", "UNLOADING"):
                continue
            if name in dead:
                cause, detail = "stub_died", f"stub process died: {', '.join(dead[name])}"
                if name not in self._unhealthy_since or self._unhealthy_since[name][1] != "stub_died":
                    self.metrics.stub_deaths.labels(model=name).inc(len(dead[name]))
                    self._say(f"supervisor: model {name}: {detail}")
            elif state != "READY":
                cause, detail = "not_ready", f"state {state or '?'}: {entry.get('reason', '') or 'no reason given'}"
            else:
                self.metrics.model_ready.labels(model=name).set(1)
                self._unhealthy_since.pop(name, None)
                backoff = self._model_backoff(name)
                if backoff.failures and now - self._last_reload.get(name, now) > STABLE_S:
                    backoff.reset()  # healthy for a minute since its last reload
                continue
            self.metrics.model_ready.labels(model=name).set(0)
            self._unhealthy_since.setdefault(name, (now, cause))
            if self._model_backoff(name).ready(now):
                self._reload(name, cause, detail)

    def _reload_config(self, client, model: str) -> str:
        """The model's served config with a fresh ``morphocam_supervisor_reload`` parameter.

        A loaded model (READY, a stub dead) is not reloaded by a plain load: Triton skips a model whose
        files did not change, and a config equal to the served one only updates instance groups in
        place, leaving the dead instance as it is. Any other change makes Triton load a complete new
        copy beside the old one (which keeps serving on its live instances) and swap them; the model
        code reads its parameters by name and ignores this one.
        """
        self._generation += 1
        config = client.get_model_config(model)
        config.setdefault("parameters", {})["morphocam_supervisor_reload"] = {"string_value": str(self._generation)}
        return json.dumps(config)

    def _reload(self, model: str, cause: str, detail: str) -> None:
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        t0 = time.monotonic()
        client = httpclient.InferenceServerClient(self.server.http_url, connection_timeout=10.0,
                                                  network_timeout=self.opt.load_timeout_s)
        try:
            client.load_model(model, config=self._reload_config(client, model) if cause == "stub_died" else None)
            error = None
        except Exception as exc:  # noqa: BLE001 - refused, timed out, or the server went away mid-load
            error = str(exc) if isinstance(exc, InferenceServerException) else f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
        now = time.monotonic()
        backoff = self._model_backoff(model)
        if error is None:
            since = self._unhealthy_since.pop(model, (t0, cause))[0]
            # Not a reset: a stub that dies again soon after this reload (OOM at warm-up, a crash on
            # the first requests) is reloaded ever slower instead of in a loop; a minute healthy resets.
            backoff.failed(now)
            self._last_reload[model] = now
            self._snapshot_stubs({model})
            self.metrics.model_reloads.labels(model=model, cause=cause, outcome="ok").inc()
            self.metrics.model_ready.labels(model=model).set(1)
            self._event("model_reload", model=model, cause=cause, ok=True, seconds=now - t0,
                        unhealthy_seconds=now - since)
            self._say(f"supervisor: model {model} reloaded in {now - t0:.1f} s ({detail})")
            return
        wait = backoff.failed(now)
        self.metrics.model_reloads.labels(model=model, cause=cause, outcome="failed").inc()
        self._event("model_reload", model=model, cause=cause, ok=False, seconds=now - t0, error=error[:2000],
                    retry_in=wait)
        self._say(f"supervisor: model {model} failed to reload ({detail}); the server says: {error}; "
                  f"next try in {wait:.0f} s (attempt {backoff.failures}); the other models keep serving")
