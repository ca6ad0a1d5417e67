"""Export stage: checkpoint -> ONNX (parity-checked) -> engine/precision measurements -> Triton repository.

Modules: :mod:`morphocam.export.config` (options), :mod:`morphocam.export.onnx_export` (the graph), :mod:`morphocam.export.parity`
(ONNX Runtime vs PyTorch on real images), :mod:`morphocam.export.data` (real images for parity, evaluation and
calibration), :mod:`morphocam.export.engines` (ONNX Runtime / OpenVINO runners, speed and accuracy),
:mod:`morphocam.export.quantize` (static INT8), :mod:`morphocam.export.tensorrt_build` (GPU plan, untested here),
:mod:`morphocam.export.pbtxt` (configs built through Triton's protobuf), :mod:`morphocam.export.repository` (the layout),
:mod:`morphocam.export.cli` (``morphocam-export``).
"""

from .errors import ExportError

__all__ = ["ExportError"]
