"""The batched on-device augmentation: what it must keep, what it must change, and that it is seeded."""

from __future__ import annotations

import pytest
import torch

from morphocam.training.augment import FILL, BatchAugment

STILL = dict(degrees=0.0, translate=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=0.0, saturation=0.0,
             hue=0.0, flips=False)


def test_zero_ranges_leave_the_images_unchanged():
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(BatchAugment(**STILL)(x), x, atol=1e-5, rtol=0)


def test_flips_alone_give_exact_mirror_images():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 20, 20)
    y = BatchAugment(**{**STILL, "flips": True})(x)
    views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
    for i in range(len(x)):
        assert min(float((y[i] - v[i]).abs().max()) for v in views) < 1e-5
    assert float((y - x).abs().max()) > 0.1  # 16 images: some were flipped


def test_rotation_turns_about_the_centre_and_fills_corners_with_background_grey():
    torch.manual_seed(1)
    x = torch.zeros(32, 3, 33, 33)
    x[:, :, 14:19, 14:19] = 1.0  # a white square at the centre
    y = BatchAugment(**{**STILL, "degrees": 180.0})(x)
    assert torch.all(y[:, :, 16, 16] > 0.99)  # the centre stays where it is
    corners = y[:, 0, 0, 0]
    assert torch.any((corners - FILL / 255).abs() < 0.02)  # rotated corners come from outside: grey, not black
    assert torch.all(y[:, :, 2, 16] < 0.01)  # the black ring inside the image stays black


def test_every_image_gets_its_own_draw_and_a_seed_repeats_them():
    x = torch.rand(1, 3, 24, 24).repeat(6, 1, 1, 1)
    torch.manual_seed(7)
    a = BatchAugment()(x)
    torch.manual_seed(7)
    b = BatchAugment()(x)
    torch.testing.assert_close(a, b)
    assert all(float((a[0] - a[i]).abs().max()) > 0.01 for i in range(1, 6))


@pytest.mark.parametrize("name, kwargs", [("brightness", dict(brightness=0.2)), ("contrast", dict(contrast=0.2)),
                                          ("saturation", dict(saturation=0.2)), ("hue", dict(hue=0.02))])
def test_colour_jitter_changes_colour_within_its_range_and_stays_in_range(name, kwargs):
    torch.manual_seed(3)
    x = torch.rand(8, 3, 16, 16) * 0.6 + 0.2
    y = BatchAugment(**{**STILL, **kwargs})(x)
    assert y.min() >= 0 and y.max() <= 1
    change = (y - x).abs().amax((1, 2, 3))
    assert torch.all(change > 1e-4), name  # every image is jittered
    assert torch.all(change < 0.35), name  # by a bounded amount (20% of the signal, at most)
