"""The deployable graph: uint8 NHWC frames in, LOGITS and PROBABILITIES out, normalisation inside.

``IMAGES`` uint8 [N, H, W, 3] (dynamic N) -> float, /255, (x - mean) / std, NHWC -> NCHW -> MorphoNet
-> ``LOGITS`` [N, K] and ``PROBABILITIES`` = softmax(LOGITS) [N, K], both float32. The arithmetic is
the same as :func:`morphocam.preprocess.normalise`, so parity is exact up to float rounding.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from morphocam.contract import INPUT_NAME, OUTPUT_LOGITS, OUTPUT_PROBABILITIES, InputContract

from .errors import ExportError

OUTPUT_NAMES = (OUTPUT_LOGITS, OUTPUT_PROBABILITIES)


class DeployableModel(torch.nn.Module):
    """Wraps a MorphoNet so that it takes the frames exactly as the clients send them."""

    def __init__(self, net: torch.nn.Module, contract: InputContract):
        super().__init__()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        logits = self.net((x - self.mean) / self.std)
        return logits, torch.softmax(logits, dim=-1)


def export_onnx(net: torch.nn.Module, contract: InputContract, path: Path, opset: int = 18,
                exporter: str = "dynamo") -> dict:
    """Export to ``path`` (one self-contained file), run ``onnx.checker``; returns graph facts.

    ``dynamo`` (torch.export) specialises the TF-"same" padding of the Lite0 backbone to the fixed
    H x W and gives a graph of ~130 nodes; ``legacy`` (TorchScript tracing) is ~10x faster to run
    but keeps the runtime shape arithmetic (~600 nodes). If dynamo fails, legacy is used and recorded.
    """
    import onnx

    wrapper = DeployableModel(net, contract).eval()
    dummy = torch.zeros(2, contract.height, contract.width, 3, dtype=torch.uint8)
    path = Path(path)
    used = exporter
    sink = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            try:
                batch = torch.export.Dim("batch", min=1, max=4096)
                program = torch.onnx.export(wrapper, (dummy,), dynamo=True, opset_version=opset,
                                            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                            dynamic_shapes={"images": {0: batch}}, verbose=False)
                program.save(str(path), external_data=False)
            except Exception as exc:  # noqa: BLE001 - any exporter failure falls back, and is recorded
                used = f"legacy (dynamo failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                exporter = "legacy"
        if exporter == "legacy":
            axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
            torch.onnx.export(wrapper, (dummy,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=axes)
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejects the exported graph: {exc}") from None
    _check_signature(model, contract)
    return {"exporter": used, "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(model.graph.node), "bytes": path.stat().st_size,
            "onnx_version": onnx.__version__, "torch_version": torch.__version__}


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _check_signature(model, contract: InputContract) -> None:
    """The graph must carry the contract's names, dtypes and shapes (batch axis symbolic)."""
    import onnx

    ins = {i.name: i for i in model.graph.input}
    outs = {o.name: o for o in model.graph.output}
    if set(ins) != {INPUT_NAME}:
        raise ExportError(f"graph inputs {sorted(ins)} != [{INPUT_NAME!r}]")
    if set(outs) != set(OUTPUT_NAMES):
        raise ExportError(f"graph outputs {sorted(outs)} != {sorted(OUTPUT_NAMES)}")
    inp = ins[INPUT_NAME]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise ExportError(f"{INPUT_NAME} is not uint8")
    dims = _dims(inp)
    if dims[1:] != [contract.height, contract.width, 3] or isinstance(dims[0], int):
        raise ExportError(f"{INPUT_NAME} shape {dims} is not [batch, {contract.height}, {contract.width}, 3]")
    for name, out in outs.items():
        d = _dims(out)
        if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or d[1:] != [contract.num_classes]:
            raise ExportError(f"{name} is not float32 [batch, {contract.num_classes}] (got {d})")
