"""The Python-backend model files in-process, with a stand-in ``triton_python_backend_utils``.

Fast checks of ``execute``'s contract (one response per request, errors inside responses, the
dynamic batch split back correctly) without starting a server; the live server is in test_serving.py.
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
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor = _Tensor
    mod.InferenceResponse = _Response
    mod.TritonError = _Error
    mod.TritonModelException = type("TritonModelException", (Exception,), {})
    mod.Logger = types.SimpleNamespace(log_info=lambda *a, **k: None, log_warn=lambda *a, **k: None)
    mod.get_input_tensor_by_name = lambda request, name: request.get(name)
    mod.triton_string_to_numpy = _triton_string_to_numpy
    return mod


def _triton_string_to_numpy(data_type: str):
    """What the real ``pb_utils.triton_string_to_numpy`` does: ``TYPE_UINT8`` -> ``np.uint8``."""
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(data_type.replace("TYPE_", "").replace("STRING", "BYTES"))


def served_config(model_dir: Path, **parameters: str) -> dict:
    """The model's exported ``config.pbtxt`` as the JSON Triton hands ``initialize`` (int64 fields as
    strings), with ``parameters`` overridden."""
    from google.protobuf import json_format

    from morphocam.export.pbtxt import parse

    config = json_format.MessageToDict(parse(Path(model_dir) / "config.pbtxt"), preserving_proto_field_name=True)
    for key, value in parameters.items():
        config.setdefault("parameters", {})[key] = {"string_value": str(value)}
    return config


def load_model_py(model_dir: Path, config: dict, version: str = "1"):
    """Import ``<model_dir>/<version>/model.py`` as Triton would and call ``initialize``."""
    sys.modules.setdefault("triton_python_backend_utils", fake_pb_utils())
    path = Path(model_dir) / version / "model.py"
    # The stub puts the version folder on sys.path: model.py imports the files copied beside it.
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_triton_model_{Path(model_dir).name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_name": config.get("name", Path(model_dir).name),
                      "model_repository": str(model_dir), "model_version": version})
    return model


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
    cfg = {"name": "morphocam_hushem_explain", "max_batch_size": 8,
           "parameters": {"checkpoint": {"string_value": "model.safetensors"}}}
    model = load_model_py(serving_repository / "morphocam_hushem_explain", cfg)
    x = np.full((1, contract.height, contract.width, 3), 120, np.uint8)
    ok, bad_target, bad_dtype = model.execute([_req(x, np.array([[2]], np.int32)),
                                               _req(x, np.array([[9]], np.int32)), _req(x.astype(np.int16))])
    assert ok.error is None and ok.out("TARGET_CLASS_USED")[0, 0] == 2
    assert ok.out("HEATMAP").shape == (1, contract.height, contract.width)
    assert "out of range" in bad_target.error.message() and "0..3" in bad_target.error.message()
    assert "UINT8" in bad_dtype.error.message()


def test_explainer_refuses_wrong_sha256(serving_repository):
    cfg = {"name": "x", "max_batch_size": 8, "parameters": {"checkpoint_sha256": {"string_value": "0" * 64}}}
    mod = fake_pb_utils()
    sys.modules.setdefault("triton_python_backend_utils", mod)
    with pytest.raises(Exception, match="sha256"):
        load_model_py(serving_repository / "morphocam_hushem_explain", cfg)


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
