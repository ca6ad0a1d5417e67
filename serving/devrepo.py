"""A minimal model repository for tests and development, in the agreed export layout.

Stand-in for ``export/`` (which owns the real repository): ONNX via a small wrapper (uint8 NHWC ->
normalise -> NCHW -> model -> LOGITS, PROBABILITIES), hand-written ``config.pbtxt`` files, labels,
warm-up frame, contract, and the explainer with the checkpoint and its sha256.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from morphocam.contract import (EXPLAIN_HEATMAP, EXPLAIN_OVERLAY_PNG, EXPLAIN_SUFFIX, EXPLAIN_TARGET, INPUT_NAME,
                                OUTPUT_LOGITS, OUTPUT_PROBABILITIES, InputContract, model_name_for)

HERE = Path(__file__).resolve().parent
CLASSIFIER_PY = HERE / "triton_models" / "classifier.py"
EXPLAINER_PY = HERE / "triton_models" / "explainer.py"


def export_onnx(model, contract: InputContract, path: Path, opset: int = 17) -> Path:
    """uint8 [N,H,W,3] -> (LOGITS, PROBABILITIES) float32 [N,K], normalisation inside the graph."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, images):
            x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            logits = self.net((x - self.mean) / self.std)
            return logits, torch.softmax(logits, dim=-1)

    wrapper = Wrapper(model.eval()).eval()
    dummy = torch.zeros(2, contract.height, contract.width, 3, dtype=torch.uint8)
    with torch.no_grad():
        torch.onnx.export(wrapper, (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_LOGITS, OUTPUT_PROBABILITIES], opset_version=opset,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_LOGITS: {0: "batch"},
                                        OUTPUT_PROBABILITIES: {0: "batch"}}, dynamo=False)
    return path


def classifier_config(name: str, c: InputContract, engine: str = "onnxruntime", precision: str = "fp32",
                      model_file: str = "model.onnx", threads: int = 0, instances: int = 1,
                      max_batch: int = 32, queue_delay_us: int = 2000, max_queue: int = 256) -> str:
    k = c.num_classes
    return f'''name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "{INPUT_NAME}" data_type: TYPE_UINT8 dims: [ {c.height}, {c.width}, 3 ] }} ]
output [
  {{ name: "{OUTPUT_PROBABILITIES}" data_type: TYPE_FP32 dims: [ {k} ] label_filename: "labels.txt" }},
  {{ name: "{OUTPUT_LOGITS}" data_type: TYPE_FP32 dims: [ {k} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
  default_queue_policy {{ max_queue_size: {max_queue} timeout_action: REJECT }}
}}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "engine" value {{ string_value: "{engine}" }} }}
parameters {{ key: "precision" value {{ string_value: "{precision}" }} }}
parameters {{ key: "model_file" value {{ string_value: "{model_file}" }} }}
parameters {{ key: "threads" value {{ string_value: "{threads}" }} }}
model_warmup [ {{
  name: "real_frame"
  batch_size: 1
  inputs {{ key: "{INPUT_NAME}" value {{ data_type: TYPE_UINT8 dims: [ {c.height}, {c.width}, 3 ] input_data_file: "IMAGES" }} }}
}} ]
'''


def explainer_config(name: str, c: InputContract, sha256: str, max_batch: int = 8) -> str:
    k = c.num_classes
    return f'''name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_UINT8 dims: [ {c.height}, {c.width}, 3 ] }},
  {{ name: "{EXPLAIN_TARGET}" data_type: TYPE_INT32 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "{OUTPUT_PROBABILITIES}" data_type: TYPE_FP32 dims: [ {k} ] label_filename: "labels.txt" }},
  {{ name: "{EXPLAIN_HEATMAP}" data_type: TYPE_FP32 dims: [ {c.height}, {c.width} ] }},
  {{ name: "{EXPLAIN_OVERLAY_PNG}" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "{EXPLAIN_TARGET}_USED" data_type: TYPE_INT32 dims: [ 1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "checkpoint" value {{ string_value: "model.safetensors" }} }}
parameters {{ key: "checkpoint_sha256" value {{ string_value: "{sha256}" }} }}
'''


def build_dev_repository(checkpoint: Path, out: Path, warmup_image: Path | None = None,
                         engine: str = "onnxruntime", precision: str = "fp32") -> Path:
    """Write ``out/morphocam_<dataset>`` and ``out/morphocam_<dataset>_explain`` from a checkpoint."""
    from training.checkpoint import contract_of, load_checkpoint, verify_sha256

    checkpoint = Path(checkpoint)
    digest = verify_sha256(checkpoint)
    model, meta = load_checkpoint(checkpoint, verify=False)
    c = contract_of(meta)
    dataset = c.dataset or meta.get("dataset", "hushem")
    name = model_name_for(dataset)
    labels = "\n".join(c.classes) + "\n"

    cls_dir = Path(out) / name
    (cls_dir / "1").mkdir(parents=True, exist_ok=True)
    (cls_dir / "warmup").mkdir(exist_ok=True)
    export_onnx(model, c, cls_dir / "1" / "model.onnx")
    shutil.copyfile(CLASSIFIER_PY, cls_dir / "1" / "model.py")
    c.save(cls_dir / "1" / "contract.json")
    (cls_dir / "labels.txt").write_text(labels)
    (cls_dir / "config.pbtxt").write_text(classifier_config(name, c, engine, precision))
    if warmup_image is not None:
        from morphocam.preprocess import load_frame

        frame = load_frame(warmup_image, c.height, c.width)
    else:
        frame = np.full((c.height, c.width, 3), 128, np.uint8)
    (cls_dir / "warmup" / "IMAGES").write_bytes(np.ascontiguousarray(frame, np.uint8).tobytes())
    (cls_dir / "model_card.json").write_text(json.dumps(
        {"name": name, "dataset": dataset, "classes": list(c.classes), "checkpoint_sha256": digest,
         "note": "development repository written by serving.devrepo"}, indent=2) + "\n")

    exp_dir = Path(out) / (name + EXPLAIN_SUFFIX)
    (exp_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXPLAINER_PY, exp_dir / "1" / "model.py")
    shutil.copyfile(checkpoint, exp_dir / "1" / "model.safetensors")
    (exp_dir / "1" / "model.safetensors.sha256").write_text(f"{digest}  model.safetensors\n")
    (exp_dir / "labels.txt").write_text(labels)
    (exp_dir / "config.pbtxt").write_text(explainer_config(name + EXPLAIN_SUFFIX, c, digest))
    return Path(out)
