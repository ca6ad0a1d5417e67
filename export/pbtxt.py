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
CONFIGS_DIR = "configs"  # Triton --model-config-name=<name> reads <model>/configs/<name>.pbtxt
EXPLAIN_TARGET_USED = EXPLAIN_TARGET + "_USED"


def _params(cfg: mc.ModelConfig, values: dict[str, str]) -> None:
    for key, value in values.items():
        cfg.parameters[key].string_value = str(value)


def _io(contract: InputContract, cfg: mc.ModelConfig, outputs: list[tuple[str, int, list[int]]] | None = None) -> None:
    """``IMAGES`` in; ``outputs`` (name, data type, dims without the batch axis; default PROBABILITIES
    only) out. PROBABILITIES carries ``labels.txt`` for Triton's classification extension."""
    inp = cfg.input.add(name=INPUT_NAME, data_type=mc.TYPE_UINT8)
    inp.dims.extend([contract.height, contract.width, 3])
    for out_name, dtype, dims in outputs or [(OUTPUT_PROBABILITIES, mc.TYPE_FP32, [contract.num_classes])]:
        out = cfg.output.add(name=out_name, data_type=dtype, dims=dims)
        if out_name == OUTPUT_PROBABILITIES:
            out.label_filename = LABELS_FILE


# ONNX TensorProto element type -> Triton data type, for the outputs a classifier graph can have.
_ONNX_TO_TRITON = {1: mc.TYPE_FP32, 2: mc.TYPE_UINT8, 3: mc.TYPE_INT8, 5: mc.TYPE_INT16, 6: mc.TYPE_INT32,
                   7: mc.TYPE_INT64, 9: mc.TYPE_BOOL, 10: mc.TYPE_FP16, 11: mc.TYPE_FP64, 16: mc.TYPE_BF16}


def graph_outputs(onnx_file: Path) -> list[tuple[str, int, list[int]]]:
    """Every output of the ONNX graph as (name, Triton data type, dims after the batch axis; -1 = dynamic),
    in graph order: the config declares exactly what the graph computes, whatever outputs it gains."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    outs = []
    for o in graph.output:
        t = o.type.tensor_type
        if t.elem_type not in _ONNX_TO_TRITON:
            raise ValueError(f"{onnx_file}: output {o.name} has ONNX element type {t.elem_type}, not servable")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]
        outs.append((o.name, _ONNX_TO_TRITON[t.elem_type], dims or [1]))
    return outs


def default_outputs(contract: InputContract, trust: bool = True) -> list[tuple[str, int, list[int]]]:
    """What a classifier graph computes when no graph is at hand: LOGITS and PROBABILITIES, and with
    ``trust`` the OOD_SCORE, IN_DOMAIN and PREDICTION_SET the exporter adds (graph order)."""
    k = contract.num_classes
    outs = [(OUTPUT_LOGITS, mc.TYPE_FP32, [k]), (OUTPUT_PROBABILITIES, mc.TYPE_FP32, [k])]
    if trust:
        outs += [(OUTPUT_OOD_SCORE, mc.TYPE_FP32, [1]), (OUTPUT_IN_DOMAIN, mc.TYPE_BOOL, [1]),
                 (OUTPUT_PREDICTION_SET, mc.TYPE_BOOL, [k])]
    return outs


def native_threads(threads: int, instances: int) -> int:
    """``intra_op_thread_count`` per instance: ``threads``, or (0) this machine's cores split over the
    instances. Left unset, ONNX Runtime's own default collapsed throughput (49 img/s vs 150+)."""
    if threads > 0:
        return threads
    import os

    return max(1, len(os.sched_getaffinity(0)) // max(1, instances))


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


def classifier_config(name: str, contract: InputContract, *, target: str = "cpu", backend: str = "onnxruntime",
                      outputs: list[tuple[str, int, list[int]]] | None = None, max_batch_size: int = 32,
                      queue_delay_us: int = 2000, max_queue_size: int = 256, queue_timeout_us: int = 0,
                      instances: int = 1, engine: str = "onnxruntime", precision: str = "fp32",
                      model_file: str = "model.onnx", threads: int = 0, warmup: bool = True,
                      trust: bool = True) -> mc.ModelConfig:
    """The classifier. ``backend="onnxruntime"``: Triton's own ONNX Runtime backend (``onnxruntime_onnx``)
    for target ``cpu`` (KIND_CPU, explicit intra/inter-op threads) or ``gpu-onnx-trt`` (KIND_GPU with the
    TensorRT accelerator in FP16) — the two differ only there; ``backend="python"``: the Python-backend
    ``model.py`` running ``engine`` (onnxruntime | openvino) at ``precision`` with ``threads`` (0 = all
    cores); target ``tensorrt``: a ``tensorrt_plan`` engine. ``outputs``: :func:`graph_outputs` (the
    exporter passes the graph's own); without them, :func:`default_outputs` (``trust``: with the graph's
    OOD_SCORE, IN_DOMAIN and PREDICTION_SET)."""
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    _io(contract, cfg, outputs or default_outputs(contract, trust))
    _batching(cfg, queue_delay_us, max_queue_size, queue_timeout_us)
    if backend == "python":
        cfg.backend = "python"
        cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
        _params(cfg, {"engine": engine, "precision": precision, "model_file": model_file, "threads": threads})
    elif backend != "onnxruntime":
        raise ValueError(f"unknown classifier backend {backend!r} (onnxruntime | python)")
    elif target in ("cpu", "gpu-onnx-trt"):
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = model_file
        if target == "cpu":
            cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
            _params(cfg, {"intra_op_thread_count": native_threads(threads, instances), "inter_op_thread_count": 1})
        else:
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


def cpu_equivalent(cfg: mc.ModelConfig) -> mc.ModelConfig:
    """A copy of a GPU config with only its GPU-only parts changed: every instance group KIND_CPU and the
    GPU execution accelerators removed. What a CPU machine can load to prove the rest of the config."""
    out = mc.ModelConfig()
    out.CopyFrom(cfg)
    for group in out.instance_group:
        if group.kind == mc.ModelInstanceGroup.KIND_GPU:
            group.kind = mc.ModelInstanceGroup.KIND_CPU
            del group.gpus[:]
    if out.HasField("optimization"):
        out.optimization.execution_accelerators.ClearField("gpu_execution_accelerator")
        if not out.optimization.execution_accelerators.ListFields():
            out.optimization.ClearField("execution_accelerators")
        if not out.optimization.ListFields():
            out.ClearField("optimization")
    return out


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
