"""The network's forward split so that one backbone stage's pooled features come out beside the final ones.

Why a second feature layer for the OOD score: the final pooled features are what the head separates
classes with, so training makes them invariant to how a frame was acquired. The 224 px SMIDS model
(MixUp, label smoothing, EMA) mapped another lab's sperm heads (HuSHem: other microscope, stain and
resolution) onto its own classes — the final-feature Mahalanobis score flagged 36% of them (AUROC
0.914). The globally pooled activations of the backbone's stages still carry the acquisition
statistics (texture, blur, stain, scale). Which stage is a trade-off measured on the SMIDS model
(`README`, *Trust*): a middle one (stage 4) separates the other dataset completely but also flags
mild blur and JPEG that cost no accuracy; the last one (stage 6, the exporter's default) flags 94% of
the other dataset (AUROC 0.992) and flags corruptions as they start to cost accuracy. The served score
takes the larger of the two distances, each scaled by its own validation quantile
(:mod:`morphocam.export.trust_fit`).

This module is the one place that knows how to run a backbone stage by stage, used both by the
PyTorch feature extraction of the fit and by the exported graph, so the two cannot drift apart; the
parity check compares this path with the network's own forward on every export.
"""

from __future__ import annotations

import torch

# timm EfficientNet / MobileNet-style backbones: conv_stem -> bn1 -> blocks[0..n) -> conv_head -> bn2
_STAGED = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


def num_stages(net: torch.nn.Module) -> int:
    """How many stages the backbone exposes (0 when it is not stage-addressable, e.g. SimpleCNN)."""
    features = getattr(net, "features", None)
    if features is None or not all(hasattr(features, a) for a in _STAGED):
        return 0
    return len(features.blocks)


def resolve_stage(net: torch.nn.Module, stage: int | None) -> int | None:
    """The stage to tap, or None (final features only): None / negative ask for none, and a backbone
    without addressable stages gets none; a stage past the last one is an error."""
    if stage is None or stage < 0:
        return None
    n = num_stages(net)
    if n == 0:
        return None
    if stage >= n:
        raise ValueError(f"OOD stage {stage} does not exist: the backbone has stages 0..{n - 1}")
    return stage


def forward_with_stage(net: torch.nn.Module, x: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled final features [N, C] — what the head sees —, pooled features of ``stage`` [N, C_s]) of
    normalised NCHW input; the same arithmetic as ``net.forward_features`` followed by ``net.pool``."""
    f = net.features
    h = f.bn1(f.conv_stem(x))
    tapped = None
    for i, block in enumerate(f.blocks):
        h = block(h)
        if i == stage:
            tapped = h.mean(dim=(2, 3))
    fmap = net.attention(f.bn2(f.conv_head(h)))
    return torch.flatten(net.pool(fmap), 1), tapped
