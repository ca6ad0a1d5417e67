"""Several checkpoints served as one network: their probabilities averaged inside one graph.

:class:`EnsembleNet` has the shape every exported network has (``forward_features`` -> ``pool`` ->
``head``), so :func:`morphocam.export.onnx_export.export_onnx` and the parity check take it as they
take a :class:`MorphoNet`:

- ``forward_features`` runs every member on the same normalised frames and concatenates their
  attention maps along the channels (B x N*C x h x w);
- ``pool`` is the members' own global average pool (channel-wise, so it pools each member's part);
- ``head`` splits the pooled vector back into the members' parts, applies each member's head and
  returns ``log(mean_i softmax(logits_i))``: the graph's ``PROBABILITIES`` (its softmax) are then
  exactly the members' averaged probabilities, and ``LOGITS`` their log.

One ONNX file instead of a Triton ensemble: one request, one batch, one copy of the frames, and the
same file runs on every engine the single model runs on.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from morphocam.contract import InputContract

from .errors import ExportError


class EnsembleHead(nn.Module):
    """Pooled [B, N*C] -> log of the members' averaged softmax [B, K]."""

    def __init__(self, heads: list[nn.Linear]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.in_features = sum(h.in_features for h in heads)
        self.out_features = heads[0].out_features
        self._log_n = math.log(len(heads))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        parts = torch.split(pooled, [h.in_features for h in self.heads], dim=1)
        logp = torch.stack([torch.log_softmax(h(p), dim=-1) for h, p in zip(self.heads, parts)])
        return torch.logsumexp(logp, dim=0) - self._log_n


class EnsembleNet(nn.Module):
    """N member networks of one input contract, averaged (see the module docstring)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ExportError("an ensemble needs at least 2 members")
        if len({m.head.out_features for m in members}) != 1:
            raise ExportError("ensemble members disagree on the number of classes")
        self.members = nn.ModuleList(m.eval() for m in members)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = EnsembleHead([m.head for m in members])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.forward_features(x)), 1))


def load_ensemble(checkpoints: list[Path]) -> tuple[EnsembleNet, list[dict], InputContract]:
    """Members from verified checkpoints that share one input contract (classes, size, normalisation)."""
    from morphocam.training.checkpoint import contract_of, load_checkpoint

    nets, metas = [], []
    for path in checkpoints:
        net, meta = load_checkpoint(Path(path))
        nets.append(net)
        metas.append(meta)
    contracts = [contract_of(m) for m in metas]
    if any(c.to_dict() != contracts[0].to_dict() for c in contracts[1:]):
        raise ExportError(f"ensemble members have different input contracts: "
                          f"{[c.to_dict() for c in contracts]}")
    return EnsembleNet(nets), metas, contracts[0]
