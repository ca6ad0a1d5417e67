"""The real Triton server, driven by the stock ``tritonclient.grpc`` client.

One server per session (fixture ``triton_server`` in conftest.py) on free loopback ports, serving a
repository in the export layout built from the HuSHem checkpoint (released if present, else dev).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest

from morphocam.contract import InputContract, model_name_for
from morphocam.export.config import ExportConfig
from morphocam.preprocess import load_frame

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import REPO_ROOT, datasets_root, missing_data, serving_checkpoint_path  # noqa: E402

MODEL = model_name_for("hushem")
EXPLAIN = MODEL + "_explain"


def real_frames(contract: InputContract, n: int = 8) -> tuple[np.ndarray, list[str]]:
    """Real HuSHem frames: the checkpoint's test split if recorded, else the repository's samples."""
    paths: list[Path] = []
    npz = serving_checkpoint_path().parent / "test_predictions.npz"
    root = datasets_root() / "hushem"
    if npz.is_file() and root.is_dir():
        rel = np.load(npz)["paths"]
        paths = [root / str(p) for p in rel if (root / str(p)).is_file()]
    if len(paths) < n:
        paths += sorted((REPO_ROOT / "samples" / "hushem").glob("*.BMP"))
    paths = paths[:n]
    if not paths:
        missing_data(f"no HuSHem images: neither the test split under {root} nor {REPO_ROOT / 'samples' / 'hushem'}")
    return np.stack([load_frame(p, contract.height, contract.width) for p in paths]), [p.name for p in paths]


def infer(client, frames: np.ndarray, model: str = MODEL, dtype: str = "UINT8", outputs=None, extra=()):
    inp = grpcclient.InferInput("IMAGES", list(frames.shape), dtype)
    inp.set_data_from_numpy(frames)
    return client.infer(model, [inp, *extra], outputs=outputs, client_timeout=60)


# ------------------------------------------------------------------ health, metadata, config
def test_health_and_readiness(client, triton_server):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(EXPLAIN)
    print(f"startup {triton_server.startup_seconds:.1f} s")


def test_metadata_and_config(client, contract):
    meta = client.get_model_metadata(MODEL, as_json=True)
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert inputs["IMAGES"]["datatype"] == "UINT8"
    assert [int(d) for d in inputs["IMAGES"]["shape"]] == [-1, contract.height, contract.width, 3]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert set(outputs) == {"PROBABILITIES", "LOGITS", "OOD_SCORE", "IN_DOMAIN", "PREDICTION_SET"}
    assert [int(d) for d in outputs["PROBABILITIES"]["shape"]] == [-1, contract.num_classes]
    assert outputs["IN_DOMAIN"]["datatype"] == "BOOL" and outputs["PREDICTION_SET"]["datatype"] == "BOOL"
    assert [int(d) for d in outputs["PREDICTION_SET"]["shape"]] == [-1, contract.num_classes]
    cfg = client.get_model_config(MODEL, as_json=True)["config"]
    exported = ExportConfig()  # the serving repository is exported with the defaults
    # Triton's own ONNX Runtime backend, with explicit thread counts (unset, throughput collapses)
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
    assert int(cfg["max_batch_size"]) == exported.max_batch_size and "dynamic_batching" in cfg
    assert int(cfg["parameters"]["intra_op_thread_count"]["string_value"]) >= 1
    assert cfg["parameters"]["inter_op_thread_count"]["string_value"] == "1"
    ecfg = client.get_model_config(EXPLAIN, as_json=True)["config"]
    assert int(ecfg["max_batch_size"]) == exported.explain_max_batch_size
    assert {o["name"] for o in ecfg["output"]} == {"PROBABILITIES", "HEATMAP", "OVERLAY_PNG", "TARGET_CLASS_USED"}


# ------------------------------------------------------------------ classification
def test_classification_matches_in_process_and_fp32_ort(client, serving_repository, contract):
    import onnxruntime as ort

    from morphocam.engines import EngineSettings, make_runner

    frames, names = real_frames(contract, 8)
    res = infer(client, frames)
    probs, logits = res.as_numpy("PROBABILITIES"), res.as_numpy("LOGITS")
    assert probs.shape == (len(frames), contract.num_classes) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    # the in-process engine the benchmarks call the ceiling: the engine factory's ONNX Runtime session
    # (graph optimisation ALL) with the served intra-op thread count
    cfg = client.get_model_config(MODEL, as_json=True)["config"]
    settings = EngineSettings(threads=int(cfg["parameters"]["intra_op_thread_count"]["string_value"]))
    ref_logits, ref_probs = make_runner(serving_repository / MODEL / "1" / "model.onnx", settings,
                                        outputs=["LOGITS", "PROBABILITIES"])(frames)
    dp = float(np.abs(probs - ref_probs).max())
    print(f"server (Triton ONNX Runtime backend) vs in-process {settings.describe()}: max |dprob| = {dp:.2e}")
    assert dp <= 1e-5
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(serving_repository / MODEL / "1" / "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    _, fp32 = sess.run(["LOGITS", "PROBABILITIES"], {"IMAGES": frames})
    d32 = float(np.abs(probs - fp32).max())
    print(f"server vs FP32 ONNX Runtime (no graph optimisation): max |dprob| = {d32:.2e}, "
          f"argmax equal on {int((probs.argmax(1) == fp32.argmax(1)).sum())}/{len(frames)}")
    assert (probs.argmax(1) == fp32.argmax(1)).all()


def test_classification_extension_returns_labels(client, contract):
    frames, _ = real_frames(contract, 2)
    out = [grpcclient.InferRequestedOutput("PROBABILITIES", class_count=2)]
    res = infer(client, frames, outputs=out)
    top = res.as_numpy("PROBABILITIES")
    assert top.shape == (2, 2)
    for row in top:
        for entry in row:
            score, index, label = entry.decode().split(":")
            assert label == contract.classes[int(index)]
            assert 0.0 <= float(score) <= 1.0


def _stats(client, model):
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def test_concurrent_requests_are_batched(client, triton_server, contract):
    import queue

    frames, _ = real_frames(contract, 8)
    before = _stats(client, MODEL)
    done: "queue.Queue" = queue.Queue()
    n = 24
    for i in range(n):
        inp = grpcclient.InferInput("IMAGES", [1, *frames.shape[1:]], "UINT8")
        inp.set_data_from_numpy(frames[i % len(frames)][None])
        client.async_infer(MODEL, [inp], callback=lambda result, error: done.put((result, error)),
                           client_timeout=60)
    results = [done.get(timeout=60) for _ in range(n)]
    assert all(err is None for _, err in results), [str(e) for _, e in results if e][:3]
    # Triton updates its statistics after it has sent the responses: on a loaded machine the counters
    # can lag the last callbacks, so read them until they stop moving (bounded).
    after, deadline = _stats(client, MODEL), time.monotonic() + 10
    while after[0] - before[0] < n and time.monotonic() < deadline:
        time.sleep(0.2)
        after = _stats(client, MODEL)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    print(f"{inferences} inferences in {executions} executions")
    assert inferences == n
    assert executions < inferences


# ------------------------------------------------------------------ explanations
def test_explanation_returns_heatmap_and_png(client, contract):
    from PIL import Image

    frames, _ = real_frames(contract, 2)
    target = grpcclient.InferInput("TARGET_CLASS", [2, 1], "INT32")
    target.set_data_from_numpy(np.array([[-1], [1]], np.int32))
    res = infer(client, frames, model=EXPLAIN, extra=(target,))
    heat = res.as_numpy("HEATMAP")
    assert heat.shape == (2, contract.height, contract.width) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() > 0.0
    probs = res.as_numpy("PROBABILITIES")
    used = res.as_numpy("TARGET_CLASS_USED").reshape(-1)
    assert used[0] == probs[0].argmax() and used[1] == 1
    for png in res.as_numpy("OVERLAY_PNG").reshape(-1):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(png))
        img.load()
        assert img.size == (contract.width, contract.height) and img.mode == "RGB"


def test_explanation_default_target_without_input(client, contract):
    frames, _ = real_frames(contract, 1)
    res = infer(client, frames, model=EXPLAIN)
    assert res.as_numpy("TARGET_CLASS_USED")[0, 0] == res.as_numpy("PROBABILITIES")[0].argmax()


# ------------------------------------------------------------------ model folders stand on their own
# Imported at start-up (a .pth line) by the stubs' environment below: inside every stub, `import morphocam`
# fails however the project is installed (editable finder, site-packages, cwd), as in a stock NGC container.
BLOCK_PROJECT = """
import importlib.abc, sys

class _NoMorphocam(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "morphocam" or name.startswith("morphocam."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the model folder must not need it)")
        return None

sys.meta_path.insert(0, _NoMorphocam())
"""

# A probe served beside the explainer: answers with the file `import morphocam` found, or "" if it failed.
PROBE_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        try:
            import morphocam
            found = morphocam.__file__ or "namespace"
        except ImportError:
            found = ""
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("FOUND", np.array([found.encode()],
                dtype=np.object_))]) for _ in requests]
"""
PROBE_CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
input { name: "X" data_type: TYPE_INT32 dims: 1 }
output { name: "FOUND" data_type: TYPE_STRING dims: 1 }
instance_group { count: 1 kind: KIND_CPU }
"""


def python_without_the_project(root: Path) -> Path:
    """A venv for the stubs: this interpreter's installed packages (torch, timm, grad-cam, numpy...) as
    plain path entries (their .pth files, e.g. an editable install's finder, are not run), and a
    blocker for ``morphocam``. The stub's interpreter is isolated (PYTHONPATH is ignored), so the
    environment it starts from is the one place to take the project away."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    packages = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "dependencies.pth").write_text("\n".join(packages) + "\n")
    (site / "no_morphocam.py").write_text(BLOCK_PROJECT)
    (site / "no_morphocam.pth").write_text("import no_morphocam\n")
    return root / "bin" / "python3"


def test_explain_folder_serves_without_the_project_on_the_stub_path(serving_repository, contract, tmp_path):
    import shutil

    from morphocam.serving.launcher import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(serving_repository / EXPLAIN, repo / EXPLAIN)  # a real copy: no path back into the project
    (repo / "probe" / "1").mkdir(parents=True)
    (repo / "probe" / "1" / "model.py").write_text(PROBE_MODEL)
    (repo / "probe" / "config.pbtxt").write_text(PROBE_CONFIG)
    elsewhere = tmp_path / "cwd"  # the stubs put the server's working directory on sys.path
    elsewhere.mkdir()
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=180,
                      stub_python=python_without_the_project(tmp_path / "venv"), cwd=elsewhere) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            x = grpcclient.InferInput("X", [1], "INT32")
            x.set_data_from_numpy(np.zeros(1, np.int32))
            found = c.infer("probe", [x]).as_numpy("FOUND")[0]
            assert found == b"", f"the stubs can import morphocam from {found!r}: the test proves nothing"
            frames, _ = real_frames(contract, 2)
            res = infer(c, frames, model=EXPLAIN)
        finally:
            c.close()
    heat = res.as_numpy("HEATMAP")
    assert heat.shape == (2, contract.height, contract.width) and heat.max() > 0.0
    assert res.as_numpy("OVERLAY_PNG")[0, 0][:8] == b"\x89PNG\r\n\x1a\n"
    assert (res.as_numpy("TARGET_CLASS_USED")[:, 0] == res.as_numpy("PROBABILITIES").argmax(1)).all()


# ------------------------------------------------------------------ bad input, then a good request
def _bad_cases(contract, max_batch: int):
    h, w = contract.height, contract.width
    target = grpcclient.InferInput("TARGET_CLASS", [1, 1], "INT32")
    target.set_data_from_numpy(np.array([[contract.num_classes + 3]], np.int32))
    return {
        "wrong dtype": (MODEL, np.zeros((1, h, w, 3), np.float32), "FP32", (), ["data-type", "FP32", "UINT8"]),
        "wrong shape": (MODEL, np.zeros((1, h - 24, w, 3), np.uint8), "UINT8", (), ["shape"]),
        "empty batch": (MODEL, np.zeros((0, h, w, 3), np.uint8), "UINT8", (), ["byte size", "got 0"]),
        "batch too large": (MODEL, np.zeros((max_batch + 1, h, w, 3), np.uint8), "UINT8", (),
                            ["batch", str(max_batch)]),
        "unknown model": ("morphocam_nosuch", np.zeros((1, h, w, 3), np.uint8), "UINT8", (), ["unknown model"]),
        "target out of range": (EXPLAIN, np.zeros((1, h, w, 3), np.uint8), "UINT8", (target,),
                                ["out of range", f"0..{contract.num_classes - 1}"]),
    }


@pytest.mark.parametrize("case", ["wrong dtype", "wrong shape", "empty batch", "batch too large",
                                  "unknown model", "target out of range"])
def test_bad_input_gets_clear_error_then_good_request_succeeds(client, contract, case):
    max_batch = int(client.get_model_config(MODEL, as_json=True)["config"]["max_batch_size"])
    model, data, dtype, extra, words = _bad_cases(contract, max_batch)[case]
    with pytest.raises(InferenceServerException) as info:
        infer(client, data, model=model, dtype=dtype, extra=extra)
    message = str(info.value)
    print(f"{case}: {message}")
    assert all(word.lower() in message.lower() for word in words), message
    frames, _ = real_frames(contract, 1)
    good = infer(client, frames, model=EXPLAIN if model == EXPLAIN else MODEL)
    assert good.as_numpy("PROBABILITIES").shape == (1, contract.num_classes)


# ------------------------------------------------------------------ lifecycle
def _descendants(pid: int) -> list[int]:
    from morphocam.serving.processes import descendants

    return descendants(pid)


def test_busy_port_refused_and_clean_stop(triton_server, serving_repository, tmp_path):
    from morphocam.serving.launcher import PortInUseError, TritonServer

    # A busy port is refused with a clear message before anything starts.
    busy = TritonServer(serving_repository, grpc_port=triton_server.grpc_port, http_port=0, metrics_port=0)
    with pytest.raises(PortInUseError, match=f"{triton_server.grpc_port}.*already in use"):
        busy.start()
    assert busy.process is None

    # A small server (classifier only, on its Python-backend config: stubs and shm to clean up) starts,
    # runs, stops with no child processes or shm left.
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(serving_repository / MODEL, repo / MODEL)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=120,
                      classifier_engine="python-ort") as srv:
        pid = srv.pid
        stubs = _descendants(pid)
        assert stubs, "the Python backend should run a stub process"
        segments = srv.shm_segments()
        assert segments, "the Python backend should create shm segments with our prefix"
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        assert c.is_model_ready(MODEL)
        c.close()
    assert srv.process is None
    for p in [pid, *stubs]:
        assert not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().split(")")[1][:3]
    assert not any(s.exists() for s in segments)


def _leave_server_side_time_wait(port: int) -> None:
    """Leave a TIME-WAIT socket whose local port is ``port``: the accepting side closes first."""
    import socket

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # active close: this end (local port == ``port``) goes to TIME-WAIT
        client.recv(1)    # wait for the FIN so the client's close completes the handshake
        client.close()


def test_stop_then_immediate_restart_on_the_same_ports(serving_repository, tmp_path):
    """A stopped server leaves its ports' connections in TIME-WAIT; the next start must not take
    that for "in use" (the server binds with SO_REUSEADDR, and so does the port check)."""
    import psutil

    from morphocam.serving.launcher import TritonServer

    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(serving_repository / MODEL, repo / MODEL)
    first = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=120)
    with first:
        c = grpcclient.InferenceServerClient(first.grpc_url)
        assert c.is_model_ready(MODEL)
        c.close()
    ports = (first.grpc_port, first.http_port, first.metrics_port)
    # The precondition of the bug: sockets on these ports linger in TIME-WAIT while nothing listens.
    # Whether the stopped server's own connections end there depends on which side closed first
    # (on CI the clients did, leaving TIME-WAIT on their ephemeral ports only), so make it certain:
    # on each port, accept one connection and close the accepting end first, as a server does.
    for port in ports:
        _leave_server_side_time_wait(port)
    lingering = {k.laddr.port for k in psutil.net_connections("tcp")
                 if k.laddr and k.laddr.port in ports and k.status == psutil.CONN_TIME_WAIT}
    assert lingering == set(ports), f"expected TIME-WAIT sockets on all of {ports}, found {lingering}"
    with TritonServer(repo, grpc_port=ports[0], http_port=ports[1], metrics_port=ports[2],
                      startup_timeout=120) as again:
        c = grpcclient.InferenceServerClient(again.grpc_url)
        assert c.is_model_ready(MODEL)
        c.close()


def test_cli_serves_until_sigint(serving_repository, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from morphocam.serving.launcher import free_port

    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(serving_repository / MODEL, repo / MODEL)
    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "morphocam.serving.cli", "--model-repository", str(repo),
                             "--grpc-port", ports[0], "--http-port", ports[1], "--metrics-port", ports[2]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    lines = []
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:
            lines.append(line)
            if "press Ctrl-C" in line or time.monotonic() > deadline:
                break
        text = "".join(lines)
        assert f"127.0.0.1:{ports[0]}" in text and "metrics" in text, text
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        assert c.is_model_ready(MODEL)
        c.close()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text + rest
    assert "stopped (tritonserver exit code 0)" in rest
    assert not list(Path("/dev/shm").glob(f"morphocam_{proc.pid}_*"))


def test_cli_warns_on_public_host_and_rejects_missing_repository(tmp_path, capsys):
    from morphocam.serving.cli import main

    assert main(["--model-repository", str(tmp_path / "nothing"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "warning: binding to 0.0.0.0" in err and "morphocam-export" in err


def test_cli_public_host_with_tls_does_not_claim_there_is_no_tls(tmp_path, capsys):
    from morphocam.serving.cli import main

    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    assert main(["--model-repository", str(tmp_path / "nothing"), "--host", "0.0.0.0",
                 "--grpc-ssl-cert", str(cert), "--grpc-ssl-key", str(key)]) == 2
    err = capsys.readouterr().err
    assert "warning: binding to 0.0.0.0" in err
    assert "no authentication or TLS" not in err
    assert "gRPC is encrypted (TLS)" in err and "HTTP and metrics are plaintext" in err
    # On loopback there is nothing to warn about, with or without TLS.
    assert main(["--model-repository", str(tmp_path / "nothing"), "--grpc-ssl-cert", str(cert),
                 "--grpc-ssl-key", str(key)]) == 2
    assert "warning" not in capsys.readouterr().err
