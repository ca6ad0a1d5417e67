"""Model shapes, CBAM behaviour, freeze-then-unfreeze, MixUp targets and offline Lite0 weights."""

from __future__ import annotations

import pytest
import torch

from morphocam.training.augment import mixup, soft_cross_entropy, soft_targets
from morphocam.training.model import CBAM, build_model
from morphocam.training.pretrained import LITE_PACKAGES, lite_package_file, lite_to_timm, load_backbone_weights
from morphocam.training.trainer import set_stage


def test_cbam_attention_maps_are_probabilities_and_shape_is_kept():
    torch.manual_seed(0)
    cbam = CBAM(64)
    x = torch.randn(2, 64, 7, 7) * 5
    mc = cbam.channel(x)
    ms = cbam.spatial(mc * x)
    assert mc.shape == (2, 64, 1, 1) and ms.shape == (2, 1, 7, 7)
    for m in (mc, ms):
        assert float(m.detach().min()) >= 0.0 and float(m.detach().max()) <= 1.0
    out = cbam(x)
    assert out.shape == x.shape
    # F'' = Ms(F') * F' with F' = Mc(F) * F
    torch.testing.assert_close(out, ms * (mc * x))


@pytest.mark.parametrize("arch,cbam,channels", [("efficientnet_b0", True, 1280), ("efficientnet_b0", False, 1280),
                                                 ("simplecnn", True, 256)])
def test_models_give_logits_per_class_and_a_final_feature_map(arch, cbam, channels):
    model = build_model(arch, num_classes=4, use_cbam=cbam).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fmap = model.forward_features(x)
        logits = model(x)
    assert fmap.shape[:2] == (2, channels)
    assert logits.shape == (2, 4)
    assert isinstance(model.attention, CBAM) == cbam


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'efficientnet_b99'"):
        build_model("efficientnet_b99", 3)


def test_freeze_stage_trains_only_the_head():
    torch.manual_seed(0)
    model = build_model("simplecnn", 3)
    params = set_stage(model, 1)
    assert {id(p) for p in params} == {id(p) for p in model.head.parameters()}
    loss = model(torch.randn(4, 3, 64, 64)).sum()
    loss.backward()
    assert all(p.grad is None for p in model.body_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    params = set_stage(model, 2)
    assert len(params) == len(list(model.parameters()))


def test_soft_targets_and_mixup_targets_sum_to_one():
    labels = torch.tensor([0, 1, 2, 3, 1])
    t = soft_targets(labels, 4, smoothing=0.1)
    torch.testing.assert_close(t.sum(1), torch.ones(5))
    assert torch.allclose(t[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, 8)
    mx, mt = mixup(x, labels, 4, alpha=0.4, smoothing=0.1)
    torch.testing.assert_close(mt.sum(1), torch.ones(5))
    assert mx.shape == x.shape and not torch.equal(mx, x)
    # alpha 0 switches MixUp off: inputs untouched, targets only smoothed
    x0, t0 = mixup(x, labels, 4, alpha=0.0, smoothing=0.0)
    assert torch.equal(x0, x) and torch.equal(t0, torch.nn.functional.one_hot(labels, 4).float())


def test_soft_cross_entropy_equals_torch_cross_entropy_for_one_hot_targets():
    logits = torch.randn(6, 4)
    labels = torch.randint(0, 4, (6,))
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(soft_cross_entropy(logits, soft_targets(labels, 4, 0.1)), expected)


@pytest.mark.parametrize("name", sorted(LITE_PACKAGES))
def test_offline_lite_weights_load_strictly_into_timm(name):
    arch = LITE_PACKAGES[name][0]
    path = lite_package_file(name)  # a declared dependency: missing it is a failure, not a skip
    model = build_model(arch, 4)
    stage_sizes = tuple(len(stage) for stage in model.features.blocks)
    state = lite_to_timm(torch.load(path, map_location="cpu", weights_only=True), stage_sizes)
    model.features.load_state_dict(state, strict=True)
    fresh = build_model(arch, 4)
    desc = load_backbone_weights(fresh, arch, name)
    assert name.capitalize() in desc and "offline" in desc
    # the loaded backbone is the package's, not timm's random init
    torch.testing.assert_close(fresh.features.conv_stem.weight, model.features.conv_stem.weight)
    assert not torch.equal(build_model(arch, 4).features.conv_stem.weight, fresh.features.conv_stem.weight)
    with pytest.raises(ValueError, match=arch):
        load_backbone_weights(build_model("simplecnn", 4), "efficientnet_b0", name)


def test_a_morphocam_checkpoint_starts_a_model_with_its_backbone_and_cbam_not_its_head(tmp_path):
    """--pretrained <checkpoint>: backbone and CBAM come from a trained morphocam model of another dataset
    (3 classes), the 4-class head stays fresh; another architecture or a tampered file is refused."""
    from morphocam.contract import InputContract
    from morphocam.training.checkpoint import save_checkpoint

    torch.manual_seed(1)
    donor = build_model("tf_efficientnet_lite0", 3)
    contract = InputContract(classes=("Normal_Sperm", "Abnormal_Sperm", "Non-Sperm"), height=64, width=64,
                             dataset="smids")
    path = tmp_path / "smids.safetensors"
    meta = {"contract": contract.to_dict(), "arch": "tf_efficientnet_lite0", "use_cbam": True, "dropout": 0.2,
            "cbam_reduction": 16, "weights": "random (test)", "metrics": {}, "data_fingerprint": "test", "recipe": {}}
    save_checkpoint(donor, meta, path)

    torch.manual_seed(2)
    model = build_model("tf_efficientnet_lite0", 4)
    head_before = model.head.weight.clone()
    desc = load_backbone_weights(model, "tf_efficientnet_lite0", str(path))
    assert "backbone + CBAM" in desc and "smids" in desc and path.name in desc
    for part in ("features", "attention"):
        for (name, got), want in zip(getattr(model, part).state_dict().items(),
                                     getattr(donor, part).state_dict().values()):
            torch.testing.assert_close(got, want, msg=name)
    assert torch.equal(model.head.weight, head_before) and model.head.weight.shape[0] == 4
    # without CBAM in the model, only the backbone comes
    plain = build_model("tf_efficientnet_lite0", 4, use_cbam=False)
    assert load_backbone_weights(plain, "tf_efficientnet_lite0", str(path)).startswith("backbone of")
    with pytest.raises(ValueError, match="cannot start"):
        load_backbone_weights(build_model("tf_efficientnet_lite1", 4), "tf_efficientnet_lite1", str(path))
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        load_backbone_weights(build_model("tf_efficientnet_lite0", 4), "tf_efficientnet_lite0", str(path))
