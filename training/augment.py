"""Training-time augmentation (paper, section 2.1) and the MixUp / label-smoothing targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

# One set of ranges for both implementations below (torchvision's per-image one and the batched one).
DEGREES = 180.0
TRANSLATE = 0.08
SCALE = (0.9, 1.1)
BRIGHTNESS = CONTRAST = SATURATION = 0.2
HUE = 0.02
FILL = 200  # mean background grey (uint8)


def train_transform() -> v2.Compose:
    """Random flips, rotation, colour jitter and affine on uint8 CHW tensors.

    Sperm cells have no canonical orientation on a slide, so vertical flips and full rotations are
    label-preserving; the fill is the mean background grey so rotations do not add black corners
    that the model could learn.
    """
    fill = [FILL] * 3
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(degrees=DEGREES, fill=fill),
        v2.RandomAffine(degrees=0, translate=(TRANSLATE, TRANSLATE), scale=SCALE, fill=fill),
        v2.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION, hue=HUE),
    ])


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    # torch's global generator, like the loader path: train_state.pt saves it, so a resumed run draws
    # the same augmentations as an uninterrupted one
    return torch.rand(n) * (high - low) + low


class BatchAugment:
    """The same augmentation as :func:`train_transform`, drawn per image but applied to a whole batch
    in one pass on the batch's own device (float NCHW in [0, 1]).

    Why: on a GPU, torchvision's per-image transforms in the loader cost ~10 ms per 224 px image on one
    CPU core and starve the accelerator (an SMIDS epoch is 2,100 images); here every geometric change is
    one ``affine_grid``/``grid_sample`` call and the colour jitter a few broadcast operations. Parameters
    are drawn on the CPU from torch's global generator (a few numbers per image), so runs are seeded and
    resumable exactly as with the loader path. Differences from torchvision, by design: one resampling
    for flip+rotation+translation+scale (torchvision resamples twice), and the colour operations in a
    fixed order (brightness, contrast, saturation, hue) instead of a random one.
    """

    def __init__(self, degrees: float = DEGREES, translate: float = TRANSLATE, scale: tuple[float, float] = SCALE,
                 brightness: float = BRIGHTNESS, contrast: float = CONTRAST, saturation: float = SATURATION,
                 hue: float = HUE, fill: float = FILL / 255.0, flips: bool = True):
        self.degrees, self.translate, self.scale, self.flips = degrees, translate, scale, flips
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.fill = fill

    def geometry(self, n: int) -> torch.Tensor:
        """N x 2 x 3 affine matrices (output -> input sampling grid, normalised coordinates)."""
        angle = _uniform(n, -self.degrees, self.degrees) * (math.pi / 180.0)
        scale = _uniform(n, *self.scale)
        # torchvision translates by up to translate * side pixels; normalised coordinates span 2 per side
        shift = _uniform(2 * n, -self.translate, self.translate).view(n, 2) * 2.0
        flip_x, flip_y = (torch.where(torch.rand(2, n) < 0.5, -1.0, 1.0) if self.flips else torch.ones(2, n))
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos * flip_x, -sin * flip_y, shift[:, 0]], 1),
                             torch.stack([sin * flip_x, cos * flip_y, shift[:, 1]], 1)], 1)
        return theta

    def colour(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]

        def factor(amount: float) -> torch.Tensor:
            return _uniform(n, 1.0 - amount, 1.0 + amount).to(x.device).view(n, 1, 1, 1)

        b, c, s = factor(self.brightness), factor(self.contrast), factor(self.saturation)
        hue = _uniform(n, -self.hue, self.hue).to(x.device)
        gray_w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x * b).clamp(0, 1)
        mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = ((x - mean) * c + mean).clamp(0, 1)
        gray = (x * gray_w).sum(1, keepdim=True)
        x = ((x - gray) * s + gray).clamp(0, 1)
        # hue: rotate the chroma plane of YIQ by 2*pi*h (torchvision shifts H in HSV; same intent, smooth)
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                              device=x.device)
        cos, sin = torch.cos(2 * math.pi * hue), torch.sin(2 * math.pi * hue)
        rot = torch.zeros(n, 3, 3, device=x.device)
        rot[:, 0, 0] = 1.0
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # N x 3 x 3, RGB -> RGB
        x = torch.einsum("nij,njhw->nihw", m, x)
        return x.clamp(0, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.geometry(x.shape[0]).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # grid_sample pads with zeros: shift so that zero is the background grey, then shift back
        x = F.grid_sample(x - self.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self.colour(x + self.fill)


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
