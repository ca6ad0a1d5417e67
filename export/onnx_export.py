"""The deployable graph: uint8 NHWC frames in, LOGITS, PROBABILITIES and the trust outputs out.

``IMAGES`` uint8 [N, H, W, 3] (dynamic N) -> float, /255, (x - mean) / std, NHWC -> NCHW -> MorphoNet
-> ``LOGITS`` [N, K] and ``PROBABILITIES`` = softmax(LOGITS / T) [N, K], both float32. The arithmetic is
the same as :func:`morphocam.preprocess.normalise`, so parity is exact up to float rounding.

With fitted :class:`~morphocam.export.trust_fit.TrustParams` the same graph also returns, from the
pooled features the head already computes and (``ood_stage``) one backbone stage's pooled activations
(cost: a 1280 x 1280 and a small matmul and a K x K comparison per frame, ~1-3 % of the network), ``OOD_SCORE`` FP32 [N, 1], ``IN_DOMAIN`` BOOL [N, 1] and
``PREDICTION_SET`` BOOL [N, K] — maths in :mod:`morphocam.export.trust_math`. Everything is in
the graph so that every engine (Python backend, Triton's ONNX Runtime backend, TensorRT) returns it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from morphocam.contract import (INPUT_NAME, OUTPUT_IN_DOMAIN, OUTPUT_LOGITS, OUTPUT_OOD_SCORE,
                                OUTPUT_PREDICTION_SET, OUTPUT_PROBABILITIES, InputContract)

from .errors import ExportError
from .stage_features import forward_with_stage

OUTPUT_NAMES = (OUTPUT_LOGITS, OUTPUT_PROBABILITIES)
TRUST_OUTPUT_NAMES = OUTPUT_NAMES + (OUTPUT_OOD_SCORE, OUTPUT_IN_DOMAIN, OUTPUT_PREDICTION_SET)


class DeployableModel(torch.nn.Module):
    """Wraps a MorphoNet so that it takes the frames exactly as the clients send them."""

    def __init__(self, net: torch.nn.Module, contract: InputContract, trust=None):
        super().__init__()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.trust = trust is not None
        if self.trust:
            whitener = torch.tensor(trust.ood.whitener, dtype=torch.float32)
            self.register_buffer("whitener", whitener)
            # class means pre-multiplied by the whitener: one matmul per frame at run time
            self.register_buffer("white_means", torch.tensor(trust.ood.means @ trust.ood.whitener, dtype=torch.float32))
            self.inv_temperature = float(1.0 / trust.temperature)
            # each distance is scaled by 1 / (its own validation scale * the combined threshold)
            self.inv_threshold = float(1.0 / (trust.ood_threshold * trust.ood_scale))
            self.stage = trust.ood_stage if trust.ood_stage_fit is not None else None
            if self.stage is not None:
                fit = trust.ood_stage_fit
                self.register_buffer("stage_whitener", torch.tensor(fit.whitener, dtype=torch.float32))
                self.register_buffer("stage_white_means", torch.tensor(fit.means @ fit.whitener, dtype=torch.float32))
                self.stage_inv_threshold = float(1.0 / (trust.ood_threshold * trust.ood_stage_scale))
            self.qhat, self.lam, self.k_reg = float(trust.qhat), float(trust.lam), float(trust.k_reg)

    @staticmethod
    def _nearest_mean_distance(feats: torch.Tensor, whitener: torch.Tensor, white_means: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance [N, 1] of L2-normalised features to the nearest class mean (trust_math.Mahalanobis)."""
        unit = feats / torch.linalg.vector_norm(feats, dim=1, keepdim=True).clamp_min(1e-12)
        d2 = ((unit @ whitener).unsqueeze(1) - white_means.unsqueeze(0)).pow(2).sum(-1)
        return torch.sqrt(d2.min(dim=1, keepdim=True).values)

    def forward(self, images: torch.Tensor):
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        if not self.trust:
            logits = self.net((x - self.mean) / self.std)
            return logits, torch.softmax(logits, dim=-1)
        # MorphoNet.forward split where the pooled features appear (dropout is the identity in eval)
        x = (x - self.mean) / self.std
        if self.stage is None:
            pooled, tapped = torch.flatten(self.net.pool(self.net.forward_features(x)), 1), None
        else:
            pooled, tapped = forward_with_stage(self.net, x, self.stage)
        logits = self.net.head(pooled)
        probs = torch.softmax(logits * self.inv_temperature, dim=-1)
        ood = self._nearest_mean_distance(pooled, self.whitener, self.white_means) * self.inv_threshold
        if tapped is not None:
            ood = torch.maximum(ood, self._nearest_mean_distance(tapped, self.stage_whitener, self.stage_white_means)
                                * self.stage_inv_threshold)
        # RAPS without a sort (trust_math.set_scores): mass ranked strictly above each class + rank penalty
        higher = (probs.unsqueeze(1) > probs.unsqueeze(2)).to(probs.dtype)  # [n, k, j] = p_j > p_k
        above = (probs.unsqueeze(1) * higher).sum(-1)
        rank = 1.0 + higher.sum(-1)
        scores = above + self.lam * torch.clamp(rank - self.k_reg, min=0.0)
        return logits, probs, ood, ood <= 1.0, scores <= self.qhat


def export_onnx(net: torch.nn.Module, contract: InputContract, path: Path, opset: int = 18,
                exporter: str = "dynamo", trust=None) -> dict:
    """Export to ``path`` (one self-contained file), run ``onnx.checker``; returns graph facts.

    ``dynamo`` (torch.export) specialises the TF-"same" padding of the Lite0 backbone to the fixed
    H x W and gives a graph of ~130 nodes; ``legacy`` (TorchScript tracing) is ~10x faster to run
    but keeps the runtime shape arithmetic (~600 nodes). If dynamo fails, legacy is used and recorded.
    """
    import onnx

    wrapper = DeployableModel(net, contract, trust).eval()
    names = TRUST_OUTPUT_NAMES if trust is not None else OUTPUT_NAMES
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
                                            input_names=[INPUT_NAME], output_names=list(names),
                                            dynamic_shapes={"images": {0: batch}}, verbose=False)
                program.save(str(path), external_data=False)
            except Exception as exc:  # noqa: BLE001 - any exporter failure falls back, and is recorded
                used = f"legacy (dynamo failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                exporter = "legacy"
        if exporter == "legacy":
            axes = {name: {0: "batch"} for name in (INPUT_NAME, *names)}
            torch.onnx.export(wrapper, (dummy,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(names), dynamic_axes=axes)
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejects the exported graph: {exc}") from None
    _check_signature(model, contract, names)
    return {"exporter": used, "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(model.graph.node), "bytes": path.stat().st_size,
            "onnx_version": onnx.__version__, "torch_version": torch.__version__}


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def output_spec(contract: InputContract) -> dict[str, tuple[str, int]]:
    """Served outputs: name -> (ONNX element type name, width of the non-batch axis)."""
    k = contract.num_classes
    return {OUTPUT_LOGITS: ("FLOAT", k), OUTPUT_PROBABILITIES: ("FLOAT", k), OUTPUT_OOD_SCORE: ("FLOAT", 1),
            OUTPUT_IN_DOMAIN: ("BOOL", 1), OUTPUT_PREDICTION_SET: ("BOOL", k)}


def _check_signature(model, contract: InputContract, names=OUTPUT_NAMES) -> None:
    """The graph must carry the contract's names, dtypes and shapes (batch axis symbolic)."""
    import onnx

    ins = {i.name: i for i in model.graph.input}
    outs = {o.name: o for o in model.graph.output}
    if set(ins) != {INPUT_NAME}:
        raise ExportError(f"graph inputs {sorted(ins)} != [{INPUT_NAME!r}]")
    if set(outs) != set(names):
        raise ExportError(f"graph outputs {sorted(outs)} != {sorted(names)}")
    inp = ins[INPUT_NAME]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise ExportError(f"{INPUT_NAME} is not uint8")
    dims = _dims(inp)
    if dims[1:] != [contract.height, contract.width, 3] or isinstance(dims[0], int):
        raise ExportError(f"{INPUT_NAME} shape {dims} is not [batch, {contract.height}, {contract.width}, 3]")
    spec = output_spec(contract)
    for name, out in outs.items():
        d, (dtype, width) = _dims(out), spec[name]
        if out.type.tensor_type.elem_type != getattr(onnx.TensorProto, dtype) or d[1:] != [width]:
            raise ExportError(f"{name} is not {dtype} [batch, {width}] (got {d})")
