"""TensorRT FP16 engine (``model.plan``) for Triton's ``tensorrt_plan`` platform. UNTESTED HERE.

Written against the documented TensorRT Python API (``trt.Builder``, ``trt.OnnxParser``,
``BuilderFlag.FP16``, an optimisation profile for the dynamic batch axis). No machine this
project can use has the ``tensorrt`` package, so the path has never run; without the package or a
GPU it stops with :class:`morphocam.export.ExportError` naming what is missing. Note that a plan is tied to
the GPU model and TensorRT version it was built with: build it on the serving machine.
"""

from __future__ import annotations

from pathlib import Path

from morphocam.contract import INPUT_NAME, InputContract

from .errors import ExportError


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("target 'tensorrt' needs the NVIDIA `tensorrt` Python package and a CUDA GPU; "
                          "`tensorrt` is not installed here (pip install morphocam[gpu] on a GPU machine, "
                          "or use --target cpu / gpu-onnx-trt)") from None
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        raise ExportError("target 'tensorrt' needs a CUDA GPU to build the engine; none is visible here")
    return trt


def build_plan(onnx_file: Path, plan_file: Path, contract: InputContract, max_batch: int,
               opt_batch: int = 8, fp16: bool = True, workspace_bytes: int = 1 << 30) -> dict:
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT >= 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_file).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    hw = (contract.height, contract.width, 3)
    profile.set_shape(INPUT_NAME, (1, *hw), (min(opt_batch, max_batch), *hw), (max_batch, *hw))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see its log above)")
    Path(plan_file).write_bytes(bytes(serialized))
    return {"tensorrt_version": trt.__version__, "fp16": fp16, "profile": [1, min(opt_batch, max_batch), max_batch],
            "bytes": Path(plan_file).stat().st_size}
