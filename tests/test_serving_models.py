"""The Python-backend model files in-process, with a stand-in ``triton_python_backend_utils``.

Fast checks of ``execute``'s contract (one response per request, errors inside responses, the
dynamic batch split back correctly) without starting a server; the live server is in test_serving.py.
Also: the committed ``model_repository`` model folders hold exactly the files the exporter copies
from ``serving/triton_models/`` (no drifting copies), and the explainer's standalone network gives
the training code's logits.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest



class _Tensor:
    def __init__(self, name, array):
        self.name, self._a = name, np.asarray(array)

    def as_numpy(self):
        return self._a


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors or [], error

    def out(self, name):
        return next(t.as_numpy() for t in self.output_tensors if t.name == name)


class _Error:
    def __init__(self, msg):
        self.msg = msg

    def message(self):
        return self.msg


def fake_pb_utils() -> types.ModuleType:
    """The wheel's real ``triton_python_backend_utils`` (config helpers, type maps) with the stub-only
    classes (Tensor, InferenceResponse, TritonError, Logger) replaced by the small stand-ins above."""
    from morphocam.serving.triton_install import TritonInstall

    path = TritonInstall.find().python_backend / "triton_python_backend_utils.py"
    spec = importlib.util.spec_from_file_location("triton_python_backend_utils", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.Tensor = _Tensor
    mod.InferenceResponse = _Response
    mod.TritonError = _Error
    mod.TritonModelException = type("TritonModelException", (Exception,), {})
    mod.Logger = types.SimpleNamespace(log_info=lambda *a, **k: None, log_warn=lambda *a, **k: None)
    mod.get_input_tensor_by_name = lambda request, name: request.get(name)
    return mod


SIBLINGS = ("explain_core", "morphocam_net", "morphocam_engines")  # modules a model.py imports from its own version folder


def load_model_py(model_dir: Path, config: dict, version: str = "1", **args):
    """Import ``<model_dir>/<version>/model.py`` as Triton's stub would (version folder on ``sys.path``,
    so its sibling files are what it imports) and call ``initialize``; ``args`` add to its arguments."""
    sys.modules.setdefault("triton_python_backend_utils", fake_pb_utils())
    folder = Path(model_dir) / version
    for name in SIBLINGS:  # another folder's copies may be cached from an earlier load
        sys.modules.pop(name, None)
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"_triton_model_{Path(model_dir).name}", folder / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), "model_name": config.get("name", Path(model_dir).name),
                          "model_repository": str(model_dir), "model_version": version, **args})
    finally:
        sys.path.remove(str(folder))
    return model


def served_config(model_dir: Path, **parameters: str) -> dict:
    """The Python-backend config of the folder (``configs/python-ort.pbtxt`` where the classifier's
    ``config.pbtxt`` is Triton's ONNX Runtime backend, else ``config.pbtxt``) as the JSON dict Triton hands
    to ``initialize`` (proto field names, int64 as strings), with ``parameters`` overridden."""
    from google.protobuf import json_format

    from morphocam.export.pbtxt import CONFIGS_DIR, parse

    python_cfg = Path(model_dir) / CONFIGS_DIR / "python-ort.pbtxt"
    source = python_cfg if python_cfg.is_file() else Path(model_dir) / "config.pbtxt"
    config = json_format.MessageToDict(parse(source), preserving_proto_field_name=True)
    for key, value in parameters.items():
        config.setdefault("parameters", {})[key] = {"string_value": str(value)}
    return config


def _req(x, target=None):
    r = {"IMAGES": _Tensor("IMAGES", x)}
    if target is not None:
        r["TARGET_CLASS"] = _Tensor("TARGET_CLASS", target)
    return r


@pytest.fixture(scope="module")
def classifier(serving_repository):
    model_dir = serving_repository / "morphocam_hushem"
    return load_model_py(model_dir, served_config(model_dir, engine="onnxruntime", threads=1))


def test_classifier_batch_split_and_errors_per_request(classifier, contract):
    rng = np.random.default_rng(0)
    hw = (contract.height, contract.width)
    a = rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (1, *hw, 3), dtype=np.uint8)
    bad = [_req(a.astype(np.float32)), _req(a[:, :100]), _req(a[:0]), {}]
    responses = classifier.execute([_req(a), bad[0], _req(b), bad[1], bad[2], bad[3]])
    assert len(responses) == 6
    assert responses[0].error is None and responses[2].error is None
    for i, word in zip((1, 3, 4, 5), ("UINT8", "shape", "0 frames", "missing")):
        assert responses[i].error is not None and word in responses[i].error.message()
    # The joint batch equals each request run alone.
    alone_a = classifier.execute([_req(a)])[0].out("PROBABILITIES")
    np.testing.assert_allclose(responses[0].out("PROBABILITIES"), alone_a, atol=1e-6)
    assert responses[2].out("LOGITS").shape == (1, contract.num_classes)


def test_classifier_openvino_engine(serving_repository, contract):
    pytest.importorskip("openvino")
    model_dir = serving_repository / "morphocam_hushem"
    ov_model = load_model_py(model_dir, served_config(model_dir, engine="openvino", precision="fp32", threads=1))
    x = np.random.default_rng(1).integers(0, 256, (3, contract.height, contract.width, 3), dtype=np.uint8)
    ov = ov_model.execute([_req(x)])[0].out("PROBABILITIES")
    ort_model = load_model_py(model_dir, served_config(model_dir, engine="onnxruntime", precision="fp32", threads=1))
    ort = ort_model.execute([_req(x)])[0].out("PROBABILITIES")
    assert np.abs(ov - ort).max() < 1e-4


def test_explainer_errors_inside_responses(serving_repository, contract):
    folder = serving_repository / "morphocam_hushem_explain"
    model = load_model_py(folder, served_config(folder))
    x = np.full((1, contract.height, contract.width, 3), 120, np.uint8)
    ok, bad_target, bad_dtype = model.execute([_req(x, np.array([[2]], np.int32)),
                                               _req(x, np.array([[9]], np.int32)), _req(x.astype(np.int16))])
    assert ok.error is None and ok.out("TARGET_CLASS_USED")[0, 0] == 2
    assert ok.out("HEATMAP").shape == (1, contract.height, contract.width)
    assert "out of range" in bad_target.error.message() and "0..3" in bad_target.error.message()
    assert "UINT8" in bad_dtype.error.message()


def test_explainer_refuses_wrong_sha256(serving_repository):
    folder = serving_repository / "morphocam_hushem_explain"
    cfg = served_config(folder)
    cfg["parameters"]["checkpoint_sha256"]["string_value"] = "0" * 64
    with pytest.raises(Exception, match="sha256"):
        load_model_py(folder, cfg)


def test_explainer_takes_dtypes_from_the_config_and_refuses_one_that_misfits(serving_repository, contract):
    folder = serving_repository / "morphocam_hushem_explain"
    cfg = served_config(folder)
    out = next(o for o in cfg["output"] if o["name"] == "PROBABILITIES")
    out["data_type"] = "TYPE_FP64"  # a config asking for doubles gets doubles
    model = load_model_py(folder, cfg)
    x = np.full((1, contract.height, contract.width, 3), 120, np.uint8)
    (res,) = model.execute([_req(x)])
    assert res.error is None and res.out("PROBABILITIES").dtype == np.float64
    out["dims"] = [str(contract.num_classes + 1)]
    k = contract.num_classes
    with pytest.raises(Exception, match=rf"PROBABILITIES dims \[{k + 1}\] \(checkpoint needs \[{k}\]\)"):
        load_model_py(folder, cfg)


def test_gpu_instance_without_cuda_is_a_clear_load_error(serving_repository):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the KIND_GPU path loads")
    folder = serving_repository / "morphocam_hushem_explain"
    with pytest.raises(Exception, match="KIND_GPU instance, but this torch sees no CUDA device"):
        load_model_py(folder, served_config(folder), model_instance_kind="GPU", model_instance_device_id="0")


# ------------------------------------------------------------------ one source for every model folder's code
COMMITTED = Path(__file__).resolve().parents[1] / "model_repository"


def _model_folders():
    return sorted(p for p in COMMITTED.iterdir() if (p / "config.pbtxt").is_file())


def test_committed_model_folders_hold_exactly_the_exporters_copies(repo_root):
    from morphocam.contract import EXPLAIN_SUFFIX
    from morphocam.export.repository import MODEL_FILES

    folders = _model_folders()
    assert folders, f"no model folders under {COMMITTED}"
    sources = repo_root / "serving" / "triton_models"
    for folder in folders:
        kind = "explainer" if folder.name.endswith(EXPLAIN_SUFFIX) else "classifier"
        copies = {p.name for p in (folder / "1").glob("*.py")}
        assert copies == set(MODEL_FILES[kind]), f"{folder.name}/1: {sorted(copies)} vs {sorted(MODEL_FILES[kind])}"
        for dest, src in MODEL_FILES[kind].items():
            assert (folder / "1" / dest).read_bytes() == (sources / src).read_bytes(), \
                f"{folder.name}/1/{dest} differs from serving/triton_models/{src}: re-run morphocam-export"


def test_committed_explain_folder_is_what_the_exporter_writes(serving_repository):
    """The session fixture exports the released HuSHem checkpoint with today's exporter; the committed
    folder must be byte for byte the same (config, labels, code, checkpoint)."""
    name = "morphocam_hushem_explain"
    fresh, committed = serving_repository / name, COMMITTED / name
    if (fresh / "1" / "model.safetensors").read_bytes() != (committed / "1" / "model.safetensors").read_bytes():
        pytest.skip("the released HuSHem checkpoint is not the one committed in model_repository/")
    # bytecode the stubs (or in-process imports) wrote next to either copy is not part of the folder
    files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert files == sorted(p.relative_to(committed) for p in committed.rglob("*")
                           if p.is_file() and "__pycache__" not in p.parts)
    for rel in files:
        assert (fresh / rel).read_bytes() == (committed / rel).read_bytes(), rel


def _import_folder_copy(folder: Path, module: str):
    """Import ``module`` from a committed version folder as a top-level module, as Triton's stub does."""
    for name in SIBLINGS:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(folder))
    sys.dont_write_bytecode, before = True, sys.dont_write_bytecode  # leave no __pycache__ in the committed folder
    try:
        return importlib.import_module(module)
    finally:
        sys.dont_write_bytecode = before
        sys.path.remove(str(folder))
        for name in SIBLINGS:
            sys.modules.pop(name, None)


def test_folder_copy_gives_the_training_codes_logits(repo_root):
    """The released checkpoint through the training code (loader, network, preprocess.normalise) and
    through the committed explain folder's own files give the same logits."""
    import torch

    from morphocam.preprocess import load_frame, normalise
    from morphocam.training.checkpoint import contract_of, load_checkpoint
    from morphocam.training.model import MorphoNet

    folder = COMMITTED / "morphocam_hushem_explain" / "1"
    core = _import_folder_copy(folder, "explain_core")
    assert core.__file__ == str(folder / "explain_core.py")
    explainer = core.Explainer.from_checkpoint(folder / "model.safetensors")
    assert type(explainer.model) is not MorphoNet  # the folder's own class, not the project's
    net, meta = load_checkpoint(folder / "model.safetensors")
    c = contract_of(meta)
    frames = np.stack([load_frame(p, c.height, c.width) for p in sorted((repo_root / "samples" / "hushem").glob("*"))[:4]])
    with torch.no_grad():
        reference = net(torch.from_numpy(normalise(frames, c.mean, c.std))).numpy()
    served = explainer.explain(frames)["logits"]
    print(f"max |logit difference| training vs folder copy: {np.abs(served - reference).max():.2e}")
    np.testing.assert_allclose(served, reference, rtol=0, atol=1e-5)


def test_classifier_takes_tensor_names_from_the_config(serving_repository, contract):
    """Input and output names come from the model config, not from constants in model.py."""
    model_dir = serving_repository / "morphocam_hushem"
    cfg = served_config(model_dir, threads=1)
    cfg["input"][0]["name"] = "FRAMES"
    cfg["output"] = [o for o in cfg["output"] if o["name"] == "PROBABILITIES"]
    model = load_model_py(model_dir, cfg)
    x = np.full((2, contract.height, contract.width, 3), 90, np.uint8)
    ok, missing = model.execute([{"FRAMES": _Tensor("FRAMES", x)}, _req(x)])
    assert [t.name for t in ok.output_tensors] == ["PROBABILITIES"]
    assert ok.out("PROBABILITIES").shape == (2, contract.num_classes) and ok.out("PROBABILITIES").dtype == np.float32
    assert "missing input FRAMES" in missing.error.message()
    cfg["output"].append({"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": ["16"]})
    with pytest.raises(Exception, match="EMBEDDING"):
        load_model_py(model_dir, cfg)
