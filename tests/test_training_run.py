"""A tiny real training run on HuSHem images, checkpoint round-trip and refusal of bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from morphocam.training.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from morphocam.training.cli import evaluate_main, train_main
from morphocam.training.model import build_model


@pytest.fixture(scope="module")
def tiny_run(hushem_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    rc = train_main(["--data-dir", str(hushem_dir), "--arch", "simplecnn", "--pretrained", "none",
                     "--input-size", "64", "--limit-per-class", "8", "--freeze-unfreeze", "false",
                     "--frozen-epochs", "0", "--epochs", "6", "--lr", "3e-3", "--augment", "false",
                     "--batch-size", "8", "--output-dir", str(out), "--progress", "false", "--threads", "2"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_last_epoch_is_scored_beside_the_selected_weights(hushem_dir, tmp_path):
    # a learning rate so high that the first epoch is the best: selection and end of schedule differ
    rc = train_main(["--data-dir", str(hushem_dir), "--arch", "simplecnn", "--pretrained", "none",
                     "--input-size", "64", "--limit-per-class", "8", "--freeze-unfreeze", "false",
                     "--frozen-epochs", "0", "--epochs", "5", "--lr", "0.3", "--augment", "false", "--tta", "false",
                     "--batch-size", "8", "--output-dir", str(tmp_path), "--progress", "false", "--threads", "2"])
    assert rc == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["best_epoch"] < result["epochs_run"]
    # the last epoch's weights give the history's last validation figure, the selected ones their epoch's
    assert result["val_last_epoch"]["accuracy"] == pytest.approx(result["history"][-1]["val_accuracy"])
    assert result["val"]["accuracy"] == pytest.approx(result["history"][result["best_epoch"] - 1]["val_accuracy"])
    assert result["val_last_epoch"]["accuracy"] != result["val"]["accuracy"]
    assert result["test_last_epoch"]["n"] == result["test"]["n"]


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_its_artefacts(tiny_run):
    result = json.loads((tiny_run / "metrics.json").read_text())
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    for name in ("model.safetensors", "model.safetensors.sha256", "config.yaml", "curves.png", "roc.png",
                 "confusion.png", "test_predictions.npz"):
        assert (tiny_run / name).is_file(), name
    assert result["split"] == {"train": 22, "val": 5, "test": 5}
    # the reported test accuracy is that of the recorded test predictions
    pred = np.load(tiny_run / "test_predictions.npz")
    assert result["test"]["n"] == len(pred["labels"]) == result["split"]["test"]
    assert result["test"]["accuracy"] == pytest.approx(float(np.mean(pred["probs"].argmax(1) == pred["labels"])))
    meta = read_metadata(tiny_run / "model.safetensors")
    assert meta["contract"]["classes"] == ["Normal", "Tapered", "Pyriform", "Amorphous"]
    assert meta["contract"]["height"] == 64 and meta["data_fingerprint"] == result["data_fingerprint"]
    assert meta["weights"].startswith("random init")


@pytest.mark.slow
def test_evaluate_rederives_the_same_test_split(tiny_run, hushem_dir, capsys):
    assert evaluate_main(["--checkpoint", str(tiny_run / "model.safetensors"), "--data-dir", str(hushem_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((tiny_run / "metrics.json").read_text())
    assert printed["n"] == result["test"]["n"]
    assert printed["accuracy"] == pytest.approx(result["test"]["accuracy"])


def _meta(classes=("a", "b", "c")):
    return {"contract": {"classes": list(classes), "height": 32, "width": 32}, "arch": "simplecnn", "use_cbam": True}


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = build_model("simplecnn", 3).eval()
    save_checkpoint(model, _meta(), tmp_path / "m.safetensors")
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["contract"]["classes"] == ["a", "b", "c"]


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path):
    model = build_model("simplecnn", 3).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, _meta(), path)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_checkpoint(truncated)

    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    with pytest.raises(CheckpointError, match="no morphocam metadata"):
        load_checkpoint(bare)

    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(model, _meta(("a", "b", "c", "d")), wrong)
    with pytest.raises(CheckpointError, match="does not match the 4 classes"):
        load_checkpoint(wrong)

    tampered = tmp_path / "tampered.safetensors"
    save_checkpoint(model, _meta(), tampered)
    raw = bytearray(tampered.read_bytes())
    raw[-1] ^= 0xFF  # flip a weight bit: the sidecar sha256 no longer matches
    tampered.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tampered)

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_train_cli_reports_dataset_errors(tmp_path, capsys):
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    rc = train_main(["--data-dir", str(tmp_path), "--arch", "simplecnn", "--pretrained", "none",
                     "--output-dir", str(tmp_path / "out"), "--progress", "false"])
    assert rc == 2
    assert "class folder holds no" in capsys.readouterr().err


def _tiny_args(hushem_dir, out, augment_on: str = "loader") -> list[str]:
    # Every stateful piece on: two stages (new optimiser at the switch), augmentation, MixUp, EMA.
    return ["--augment-on", augment_on, "--data-dir", str(hushem_dir), "--arch", "simplecnn", "--pretrained", "none", "--input-size", "48",
            "--limit-per-class", "6", "--freeze-unfreeze", "true", "--frozen-epochs", "3", "--epochs", "3",
            "--mixup-alpha", "0.4", "--label-smoothing", "0.1", "--ema-decay", "0.9", "--batch-size", "8",
            "--output-dir", str(out), "--progress", "false", "--threads", "1", "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("augment_on,kill_after,carried", [("loader", 4, False), ("device", 4, False),
                                                           ("loader", 1, False), ("loader", 4, True)])
def test_a_run_killed_mid_training_resumes_to_the_same_result(hushem_dir, tmp_path, augment_on, kill_after, carried):
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    whole = tmp_path / "whole"
    assert train_main(_tiny_args(hushem_dir, whole, augment_on)) == 0

    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "morphocam.training.cli", *_tiny_args(hushem_dir, cut, augment_on)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # SIGKILL after epoch 4 (inside stage 2, mid-schedule) or after epoch 1 (inside stage 1: the resumed run
    # carries stage 1's optimiser into the rest of stage 1, then builds stage 2's afresh). The process may
    # finish one more epoch before the signal lands: with 3 epochs a stage it is still mid-stage.
    for line in proc.stdout:
        if line.startswith(f"epoch {kill_after:3d}"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (cut / "train_state.pt").is_file() and not (cut / "metrics.json").exists()
    if carried:
        # A fresh clone: only what was committed survives -- the packed parts, not the git-ignored state file.
        from morphocam.benchmarks.cli import main as bench_main

        assert bench_main(["carry", "--root", str(tmp_path), "--part-mb", "0.05"]) == 0
        assert len(list((cut / "train_state.carry").glob("part-*"))) > 1
        (cut / "train_state.pt").unlink()

    assert train_main(["--resume", str(cut)]) == 0
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((cut / "metrics.json").read_text())
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3, 4, 5, 6]
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-5, abs=1e-6)
        assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-5, abs=1e-6)
    assert a["best_epoch"] == b["best_epoch"]
    wa, wb = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)
    assert not (cut / "train_state.pt").exists()  # a finished run keeps no resume state
    assert not (cut / "train_state.carry").exists()
    split = json.loads((cut / "split.json").read_text())
    assert split["counts"] == b["split"] and len(split["test"]) == b["test"]["n"]


@pytest.mark.slow
def test_bf16_autocast_with_batched_augmentation_trains(hushem_dir, tmp_path):
    # The GPU recipe's two switches (bf16 steps, batched augmentation) forced on the CPU: the loss falls
    # and the run records them; evaluation stays float32 so the scores are those of the saved weights.
    args = [a for a in _tiny_args(hushem_dir, tmp_path, "device")]
    assert train_main([*args, "--amp", "bf16", "--epochs", "6"]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    stage2 = [h["train_loss"] for h in result["history"] if h["stage"] == 2]
    assert stage2[-1] < stage2[0]
    import yaml

    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["amp"] == "bf16" and cfg["augment_on"] == "device"


@pytest.mark.slow
def test_train_seed_changes_the_training_draws_not_the_split(hushem_dir, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for name, extra in {"default": [], "same": ["--train-seed", "42"], "other": ["--train-seed", "7"]}.items():
        out = tmp_path / name
        assert train_main([*_tiny_args(hushem_dir, out), "--epochs", "1", *extra]) == 0
        runs[name] = (json.loads((out / "split.json").read_text()), load_file(str(out / "model.safetensors")))
    split, weights = runs["default"]
    # --train-seed equal to --seed is the default run, draw for draw
    assert runs["same"][0] == split
    assert all(torch.equal(runs["same"][1][k], weights[k]) for k in weights)
    # another training seed: the same fold assignment, other weights (initialisation, augmentation, order)
    assert runs["other"][0]["test"] == split["test"] and runs["other"][0]["train"] == split["train"]
    assert not all(torch.equal(runs["other"][1][k], weights[k]) for k in weights)


def test_a_damaged_carry_is_refused_with_the_reason(hushem_dir, tmp_path, capsys):
    from morphocam.training.state_carry import pack

    run = tmp_path / "run"
    assert train_main([*_tiny_args(hushem_dir, run), "--frozen-epochs", "1", "--epochs", "0"]) == 0
    # a finished run keeps no state: give it one to pack, as a stopped run would have
    (run / "metrics.json").unlink()
    torch.save({"run": {"epoch": 1}}, run / "train_state.pt")
    carry = pack(run, part_bytes=100)
    (run / "train_state.pt").unlink()
    part = sorted(carry.glob("part-*"))[-1]
    part.write_bytes(part.read_bytes()[:-1])  # a truncated checkout
    assert train_main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "do not match manifest.json" in err and not (run / "train_state.pt").exists()


def test_resume_without_a_saved_state_is_a_clear_error(hushem_dir, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("output_dir: " + str(tmp_path) + "\n")
    assert train_main(["--resume", str(tmp_path)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
