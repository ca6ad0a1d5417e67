"""Triton ``config.pbtxt`` files built as Triton's own ``ModelConfig`` protobuf (valid by construction).

``tritonclient.grpc.model_config_pb2`` ships the message definitions; :func:`to_text` serialises
with ``google.protobuf.text_format`` and :func:`parse` reads a file back (used by the tests).
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from morphocam.contract import (EXPLAIN_HEATMAP, EXPLAIN_OVERLAY_PNG, EXPLAIN_TARGET, INPUT_NAME, OUTPUT_IN_DOMAIN,
                                OUTPUT_LOGITS, OUTPUT_OOD_SCORE, OUTPUT_PREDICTION_SET, OUTPUT_PROBABILITIES,
                                InputContract)

LABELS_FILE = "labels.txt"
WARMUP_DIR = "warmup"
EXPLAIN_TARGET_USED = EXPLAIN_TARGET + "_USED"


def _params(cfg: mc.ModelConfig, values: dict[str, str]) -> None:
    for key, value in values.items():
        cfg.parameters[key].string_value = str(value)


def _io(contract: InputContract, cfg: mc.ModelConfig) -> None:
    inp = cfg.input.add(name=INPUT_NAME, data_type=mc.TYPE_UINT8)
    inp.dims.extend([contract.height, contract.width, 3])
    cfg.output.add(name=OUTPUT_PROBABILITIES, data_type=mc.TYPE_FP32, dims=[contract.num_classes],
                   label_filename=LABELS_FILE)


def _batching(cfg: mc.ModelConfig, delay_us: int, max_queue: int, timeout_us: int) -> None:
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = delay_us
    db.default_queue_policy.max_queue_size = max_queue
    db.default_queue_policy.timeout_action = mc.ModelQueuePolicy.REJECT
    db.default_queue_policy.default_timeout_microseconds = timeout_us


def _warmup(cfg: mc.ModelConfig, contract: InputContract) -> None:
    w = cfg.model_warmup.add(name="real_frame", batch_size=1)
    wi = w.inputs[INPUT_NAME]
    wi.data_type = mc.TYPE_UINT8
    wi.dims.extend([contract.height, contract.width, 3])
    wi.input_data_file = INPUT_NAME  # relative to <model>/warmup/


def classifier_config(name: str, contract: InputContract, *, target: str = "cpu", max_batch_size: int = 32,
                      queue_delay_us: int = 2000, max_queue_size: int = 256, queue_timeout_us: int = 0,
                      instances: int = 1, engine: str = "onnxruntime", precision: str = "fp32",
                      model_file: str = "model.onnx", threads: int = 0, warmup: bool = True,
                      trust: bool = True) -> mc.ModelConfig:
    """The classifier for a target: ``cpu`` (Python backend running ORT/OpenVINO in-process),
    ``gpu-onnx-trt`` (Triton's ONNX Runtime backend with the TensorRT accelerator, FP16), ``tensorrt``
    (a ``tensorrt_plan`` engine). ``trust`` declares the graph's OOD_SCORE, IN_DOMAIN and
    PREDICTION_SET outputs (the Python-backend classifier returns whatever outputs the config lists)."""
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    _io(contract, cfg)
    cfg.output.add(name=OUTPUT_LOGITS, data_type=mc.TYPE_FP32, dims=[contract.num_classes])
    if trust:
        cfg.output.add(name=OUTPUT_OOD_SCORE, data_type=mc.TYPE_FP32, dims=[1])
        cfg.output.add(name=OUTPUT_IN_DOMAIN, data_type=mc.TYPE_BOOL, dims=[1])
        cfg.output.add(name=OUTPUT_PREDICTION_SET, data_type=mc.TYPE_BOOL, dims=[contract.num_classes])
    _batching(cfg, queue_delay_us, max_queue_size, queue_timeout_us)
    if target == "cpu":
        cfg.backend = "python"
        cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
        _params(cfg, {"engine": engine, "precision": precision, "model_file": model_file, "threads": threads})
    elif target == "gpu-onnx-trt":
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = "model.onnx"
        cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = "FP16"
        acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
        acc.parameters["trt_engine_cache_enable"] = "true"
        acc.parameters["trt_engine_cache_path"] = "/tmp/morphocam_trt_cache"
    elif target == "tensorrt":
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
        cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
    else:
        raise ValueError(f"unknown target {target!r}")
    if warmup:
        _warmup(cfg, contract)
    return cfg


def explainer_config(name: str, contract: InputContract, checkpoint_sha256: str, *, max_batch_size: int = 8,
                     queue_delay_us: int = 5000, checkpoint: str = "model.safetensors",
                     threads: int = 1, max_queue_size: int = 64,
                     queue_timeout_us: int = 30_000_000, target: str = "cpu") -> mc.ModelConfig:
    """Grad-CAM++ model (Python backend, PyTorch): probabilities, heatmap, PNG overlay, class used.

    One instance: KIND_CPU for the ``cpu`` target, KIND_GPU for the GPU targets (the model.py then
    runs PyTorch on the instance's CUDA device)."""
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    _io(contract, cfg)
    cfg.input.add(name=EXPLAIN_TARGET, data_type=mc.TYPE_INT32, dims=[1], optional=True)
    cfg.output.add(name=EXPLAIN_HEATMAP, data_type=mc.TYPE_FP32, dims=[contract.height, contract.width])
    cfg.output.add(name=EXPLAIN_OVERLAY_PNG, data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(name=EXPLAIN_TARGET_USED, data_type=mc.TYPE_INT32, dims=[1])
    kind = mc.ModelInstanceGroup.KIND_CPU if target == "cpu" else mc.ModelInstanceGroup.KIND_GPU
    cfg.instance_group.add(count=1, kind=kind)
    # Bounded queue: explanation overload is rejected fast instead of queueing without limit.
    _batching(cfg, queue_delay_us, max_queue_size, queue_timeout_us)
    _params(cfg, {"checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256, "threads": threads})
    return cfg


def to_text(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse(text_or_path) -> mc.ModelConfig:
    text = Path(text_or_path).read_text() if isinstance(text_or_path, Path) else text_or_path
    return text_format.Parse(text, mc.ModelConfig())
