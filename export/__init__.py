"""Export stage: checkpoint -> ONNX (parity-checked) -> engine/precision measurements -> Triton repository.

Modules: :mod:`export.config` (options), :mod:`export.onnx_export` (the graph), :mod:`export.parity`
(ONNX Runtime vs PyTorch on real images), :mod:`export.data` (real images for parity, evaluation and
calibration), :mod:`export.engines` (ONNX Runtime / OpenVINO runners, speed and accuracy),
:mod:`export.quantize` (static INT8), :mod:`export.tensorrt_build` (GPU plan, untested here),
:mod:`export.pbtxt` (configs built through Triton's protobuf), :mod:`export.repository` (the layout),
:mod:`export.cli` (``morphocam-export``).
"""

from .errors import ExportError

__all__ = ["ExportError"]
