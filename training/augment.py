"""Training-time augmentation (paper, section 2.1) and the MixUp / label-smoothing targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def train_transform() -> v2.Compose:
    """Random flips, rotation, colour jitter and affine on uint8 CHW tensors.

    Sperm cells have no canonical orientation on a slide, so vertical flips and full rotations are
    label-preserving; the fill is the mean background grey so rotations do not add black corners
    that the model could learn.
    """
    fill = [200, 200, 200]
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(degrees=180, fill=fill),
        v2.RandomAffine(degrees=0, translate=(0.08, 0.08), scale=(0.9, 1.1), fill=fill),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
    ])


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: (1 - s) on the true class plus s / K everywhere."""
    onehot = F.one_hot(labels, num_classes).float()
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def mixup(x: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float, smoothing: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al. 2018): x = lam*xi + (1-lam)*xj, targets likewise, lam ~ Beta(alpha, alpha)."""
    targets = soft_targets(labels, num_classes, smoothing)
    if alpha <= 0:
        return x, targets
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam = float(beta.sample())
    perm = torch.randperm(x.shape[0], generator=generator)
    return lam * x + (1.0 - lam) * x[perm], lam * targets + (1.0 - lam) * targets[perm]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
