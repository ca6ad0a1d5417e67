"""Static INT8 (ONNX Runtime QDQ) calibrated on real training images.

Weights are quantised per channel (int8, symmetric), activations per tensor (uint8) from min/max
ranges observed on the calibration frames. Only the compute-heavy ops (Conv, Gemm, MatMul) are
quantised; the in-graph normalisation, CBAM's sigmoid gates and the softmax stay in float. The
result is a QDQ graph that ONNX Runtime runs with int8 kernels and OpenVINO can also compile.
Whether it is kept is decided by measurement (:mod:`morphocam.export.engines`), not here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from morphocam.contract import INPUT_NAME

from .errors import ExportError

QUANTISED_OPS = ["Conv", "Gemm", "MatMul"]
# The OOD score's whitening matmul (onnx_export.DeployableModel) stays float: its distances are
# compared with a threshold fitted in float, and 8 bits would move frames across it.
FLOAT_INITIALIZERS = ("whitener",)


def _float_only_nodes(model_file: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    return [n.name for n in graph.node if any(i in FLOAT_INITIALIZERS for i in n.input)]


class FrameReader:
    """onnxruntime.quantization.CalibrationDataReader over uint8 NHWC frames, in small batches."""

    def __init__(self, images: np.ndarray, batch: int = 8):
        self.images, self.batch, self.pos = images, batch, 0

    def get_next(self):
        if self.pos >= len(self.images):
            return None
        x = np.ascontiguousarray(self.images[self.pos:self.pos + self.batch])
        self.pos += self.batch
        return {INPUT_NAME: x}

    def rewind(self):
        self.pos = 0


def quantize_int8(fp32_file: Path, int8_file: Path, calibration: np.ndarray) -> dict:
    """Write ``int8_file`` from ``fp32_file``; returns what was done (for the model card)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ExportError("INT8 calibration needs at least one real image")

    class Reader(FrameReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="morphocam-int8-") as tmp:
        src = Path(fp32_file)
        pre = Path(tmp) / "pre.onnx"
        preprocessed = True
        try:  # ONNX shape inference + ORT basic optimisation, as recommended before quantisation
            # (ORT's symbolic shape inference is skipped: it fails on the dynamo graph's Conv shapes)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception:  # noqa: BLE001 - fall back to the plain graph
            preprocessed = False
        keep_float = _float_only_nodes(src)
        quantize_static(str(src), str(int8_file), Reader(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=QUANTISED_OPS, nodes_to_exclude=keep_float, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibTensorRangeSymmetric": False})
    return {"method": "onnxruntime quantize_static, QDQ, MinMax calibration",
            "ops": QUANTISED_OPS, "weights": "int8 per-channel", "activations": "uint8 per-tensor",
            "calibration_images": int(len(calibration)), "pre_processed": preprocessed,
            "kept_float": keep_float,
            "bytes": Path(int8_file).stat().st_size}
