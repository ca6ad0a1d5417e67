"""Networks: a timm backbone with CBAM on its final feature map, and the SimpleCNN baseline.

Every network here has the same shape so that export and Grad-CAM++ treat them alike:
``features`` (backbone, B x C x h x w) -> ``attention`` (CBAM or identity) -> global average
pool -> dropout -> ``head`` (linear). ``attention`` is the Grad-CAM++ target layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelAttention(nn.Module):
    """CBAM channel attention Mc: shared MLP over avg- and max-pooled descriptors, then sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + mx)  # B x C x 1 x 1


class SpatialAttention(nn.Module):
    """CBAM spatial attention Ms: 7x7 conv over the channel-mean and channel-max maps, then sigmoid."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(desc))  # B x 1 x h x w


class CBAM(nn.Module):
    """Woo et al. 2018: F' = Mc(F) * F, F'' = Ms(F') * F'."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel(x) * x
        return self.spatial(x) * x


class SimpleCNN(nn.Module):
    """The paper's from-scratch baseline: four conv-BN-ReLU-pool blocks."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in widths:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.num_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MorphoNet(nn.Module):
    """features -> attention -> pool -> dropout -> head."""

    def __init__(self, features: nn.Module, num_features: int, num_classes: int,
                 use_cbam: bool = True, dropout: float = 0.2, cbam_reduction: int = 16):
        super().__init__()
        self.features = features
        self.attention = CBAM(num_features, cbam_reduction) if use_cbam else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.features(x))

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.flatten(self.pool(fmap), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def body_parameters(self):
        """Everything stage 1 of freeze-then-unfreeze keeps frozen: backbone and CBAM."""
        yield from self.features.parameters()
        yield from self.attention.parameters()


SIMPLECNN = "simplecnn"


def build_model(arch: str, num_classes: int, use_cbam: bool = True, dropout: float = 0.2,
                pretrained_timm: bool = False, cbam_reduction: int = 16) -> MorphoNet:
    """Build a network by name: ``simplecnn`` or any timm backbone name (e.g. ``efficientnet_b0``).

    ``pretrained_timm`` asks timm to download ImageNet weights from its hub (needs a network);
    offline weights are loaded afterwards by :mod:`morphocam.training.pretrained`.
    """
    if arch == SIMPLECNN:
        body = SimpleCNN()
        return MorphoNet(body, body.num_features, num_classes, use_cbam, dropout, cbam_reduction)
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"unknown backbone {arch!r}: not {SIMPLECNN!r} and not a timm model name "
                         f"(e.g. efficientnet_b0, tf_efficientnet_lite0; see timm.list_models())")
    # num_classes=0 + global_pool='' makes timm return the final feature map (B x 1280 x 7 x 7 for B0).
    body = timm.create_model(arch, pretrained=pretrained_timm, num_classes=0, global_pool="")
    return MorphoNet(body, body.num_features, num_classes, use_cbam, dropout, cbam_reduction)
