"""Triton's own ONNX Runtime backend (issue 13): built from Triton's sources, the classifiers served on it,
the Python-backend configs as engine choice and fallback, the NGC GPU repository (minus its GPU-only
parts) loaded by the real backend, and the sidecar check that stands in for the Python classifier's.

The session server (conftest ``triton_server``) already serves the native classifier, so the first
test session on a machine builds the backend (tens of seconds) and later ones reuse the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")

from morphocam.export import pbtxt  # noqa: E402
from morphocam.serving import backend_build  # noqa: E402
from morphocam.serving.launcher import ServerStartError, TritonServer  # noqa: E402
from morphocam.serving.triton_install import TritonInstall, default_cache_root  # noqa: E402
from test_serving import MODEL, infer, real_frames  # noqa: E402


def _classifier_only(serving_repository: Path, root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    os.symlink(serving_repository / MODEL, repo / MODEL)
    return repo


def _ort_reference(model_dir: Path, frames: np.ndarray) -> np.ndarray:
    from morphocam.engines import EngineSettings, make_runner

    return make_runner(model_dir / "1" / "model.onnx", EngineSettings(threads=1), outputs=["PROBABILITIES"])(frames)[0]


# ------------------------------------------------------------------ the build
def test_backend_built_for_this_onnxruntime_and_laid_out_beside_python(triton_server):
    """The session server's backend: compiled against the installed wheel's libonnxruntime, the renamed
    libtritonserver linked under its expected name, ``onnxruntime/`` beside ``python/``."""
    install = TritonInstall.find()
    folder = backend_build.ensure_backend(default_cache_root(), install.tritonserver_lib)  # cached: no rebuild
    wheel = backend_build.OrtWheel.find()
    info = json.loads((folder / "build.json").read_text())
    print(info)
    assert info["onnxruntime"] == wheel.version and info["triton_tag"] == backend_build.TRITON_TAG
    assert (folder / "libtritonserver.so").resolve() == install.tritonserver_lib.resolve()
    assert (folder / "libonnxruntime.so.1").resolve() == wheel.library.resolve()
    # the versioned ORT symbol the backend needs is the installed wheel's (rebuilt when the wheel changes)
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", str(folder / backend_build.BACKEND_LIB)],
                             capture_output=True, text=True).stdout
    assert f"OrtGetApiBase@VERS_{wheel.version}" in symbols
    backends = Path(next(a for a in triton_server.command() if a.startswith("--backend-directory=")).split("=", 1)[1])
    assert (backends / "onnxruntime" / backend_build.BACKEND_LIB).is_file()
    assert (backends / "python" / "libtriton_python.so").exists()


def test_unbuildable_backend_falls_back_to_the_python_backend(serving_repository, contract, tmp_path):
    """Sources without the ONNX Runtime header: the build fails with the reason; the server falls back to
    the classifier's ``configs/python-ort.pbtxt`` (with a warning), or refuses to start without fallback."""
    repo = _classifier_only(serving_repository, tmp_path)
    empty = tmp_path / "sources"
    for r in backend_build.TRITON_REPOS:
        (empty / "triton" / r).mkdir(parents=True)
    cache = tmp_path / "cache"
    strict = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, cache_root=cache, backend_sources=empty,
                          fallback=False)
    with pytest.raises(ServerStartError, match="onnxruntime_c_api.h is missing"):
        strict.start()
    assert strict.process is None
    frames, _ = real_frames(contract, 4)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=180, cache_root=cache,
                      backend_sources=empty) as srv:
        print(srv.warnings)
        assert srv.classifier_engine == "python-ort"
        assert any("cannot be built" in w and "onnxruntime_c_api.h" in w for w in srv.warnings)
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            assert c.get_model_config(MODEL, as_json=True)["config"]["backend"] == "python"
            probs = infer(c, frames).as_numpy("PROBABILITIES")
        finally:
            c.close()
    np.testing.assert_allclose(probs, _ort_reference(serving_repository / MODEL, frames), atol=1e-5)


def test_failed_rebuild_reports_why_and_keeps_the_cached_backend(triton_server, tmp_path, capsys):
    from morphocam.serving.cli import main

    folder = backend_build.ensure_backend(default_cache_root(), TritonInstall.find().tritonserver_lib)
    built = (folder / backend_build.BACKEND_LIB).stat().st_mtime_ns
    empty = tmp_path / "sources"
    for r in backend_build.TRITON_REPOS:
        (empty / "triton" / r).mkdir(parents=True)
    assert main(["--build-backend", "true", "--backend-sources", str(empty)]) == 1
    assert "onnxruntime_c_api.h is missing" in capsys.readouterr().err
    assert backend_build.is_built(folder) and (folder / backend_build.BACKEND_LIB).stat().st_mtime_ns == built


# ------------------------------------------------------------------ engine choice: same folder, other config
def test_python_engine_choice_serves_the_same_numbers(client, serving_repository, contract, tmp_path):
    frames, _ = real_frames(contract, 6)
    native = infer(client, frames)
    repo = _classifier_only(serving_repository, tmp_path)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=180,
                      classifier_engine="python-ort") as srv:
        assert f"--model-config-name=python-ort" in srv.command()
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            cfg = c.get_model_config(MODEL, as_json=True)["config"]
            assert cfg["backend"] == "python" and cfg["parameters"]["engine"]["string_value"] == "onnxruntime"
            res = infer(c, frames)
        finally:
            c.close()
    for name in ("PROBABILITIES", "LOGITS"):
        np.testing.assert_allclose(res.as_numpy(name), native.as_numpy(name), atol=1e-5)
    # the trust outputs computed in the graph come back from both backends alike
    np.testing.assert_allclose(res.as_numpy("OOD_SCORE"), native.as_numpy("OOD_SCORE"), rtol=1e-4)
    for name in ("IN_DOMAIN", "PREDICTION_SET"):
        assert res.as_numpy(name).dtype == np.bool_ and (res.as_numpy(name) == native.as_numpy(name)).all()


# ------------------------------------------------------------------ one layout for CPU and GPU
@pytest.fixture(scope="module")
def ngc_repository(tmp_path_factory) -> Path:
    from conftest import serving_checkpoint_path
    from morphocam.export.config import ExportConfig
    from morphocam.export.repository import write_repository

    out = tmp_path_factory.mktemp("model_repository_gpu")
    write_repository(ExportConfig(checkpoints=[serving_checkpoint_path()], output=out, target="gpu-onnx-trt",
                                  measure=False, int8=False, parity_images=2, progress=False))
    return out


def test_gpu_and_cpu_classifier_configs_differ_only_where_they_must(ngc_repository, serving_repository):
    gpu = pbtxt.parse(ngc_repository / MODEL / "config.pbtxt")
    cpu = pbtxt.parse(serving_repository / MODEL / "config.pbtxt")
    assert gpu.platform == cpu.platform == "onnxruntime_onnx"
    assert gpu.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert set(cpu.parameters) == {"intra_op_thread_count", "inter_op_thread_count"} and not gpu.parameters
    stripped = pbtxt.cpu_equivalent(gpu)
    cpu.ClearField("parameters")
    assert stripped == cpu, "beyond instance kind, accelerator and threads the two configs must be identical"


def test_ngc_repository_minus_gpu_parts_serves_on_the_real_backend(ngc_repository, contract, tmp_path):
    """The GPU repository with KIND_CPU and the TensorRT accelerator stripped (nothing else changed):
    Triton's ONNX Runtime backend loads the classifier and the explainer loads on CPU; outputs equal
    in-process ONNX Runtime."""
    repo = tmp_path / "repo"
    shutil.copytree(ngc_repository, repo, symlinks=True)
    for cfg_file in repo.glob("*/config.pbtxt"):
        cfg_file.write_text(pbtxt.to_text(pbtxt.cpu_equivalent(pbtxt.parse(cfg_file))))
    frames, _ = real_frames(contract, 4)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=240) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            assert c.get_model_config(MODEL, as_json=True)["config"]["platform"] == "onnxruntime_onnx"
            probs = infer(c, frames).as_numpy("PROBABILITIES")
            explained = infer(c, frames[:1], model=MODEL + "_explain")
        finally:
            c.close()
    np.testing.assert_allclose(probs, _ort_reference(repo / MODEL, frames), atol=1e-5)
    assert explained.as_numpy("HEATMAP").shape == (1, contract.height, contract.width)


# ------------------------------------------------------------------ outputs follow the graph
def test_config_declares_every_graph_output(serving_repository):
    """The classifier configs are written from the graph's outputs, so a graph with more outputs is
    served with all of them (read back with onnx, compared with every config)."""
    import onnx

    graph = onnx.load(str(serving_repository / MODEL / "1" / "model.onnx"), load_external_data=False).graph
    names = {o.name for o in graph.output}
    for cfg_file in [serving_repository / MODEL / "config.pbtxt", *(serving_repository / MODEL / "configs").glob("*.pbtxt")]:
        assert {o.name for o in pbtxt.parse(cfg_file).output} == names, cfg_file


# ------------------------------------------------------------------ integrity before the start
def test_tampered_native_graph_refused_before_the_server_starts(serving_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(serving_repository / MODEL, repo / MODEL)
    onnx_file = repo / MODEL / "1" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit in the weights: the graph still loads, the numbers change
    onnx_file.write_bytes(bytes(data))
    srv = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0)
    try:
        with pytest.raises(ServerStartError, match=f"{MODEL}: 1/model.onnx sha256 .* does not match"):
            srv.start()
        assert srv.process is None  # refused before tritonserver ran
    finally:
        srv.stop()
