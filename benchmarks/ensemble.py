"""``morphocam-bench ensemble``: what averaging several models buys, against what it costs to serve.

The members (by default the accuracy benchmark's cross-validated ensemble on the release split,
``results/benchmarks/accuracy/<dataset>/full/member<m>``) are put in one ONNX graph
(:class:`morphocam.export.ensemble.EnsembleNet`) and measured against member 0 alone, in one run:

- **accuracy** on the validation and test parts of the single split the members were trained in
  (``--member`` runs: the validation part is unseen by every member, so it is where the ensemble is
  chosen over a single model; the test part is scored once): the graph's accuracy, macro-F1,
  per-class F1 and macro-AUC, beside every member's own;
- **parity**: the graph's probabilities against the members' PyTorch probabilities averaged;
- **cost**: in-process ONNX Runtime images per second of the single and of the ensemble graph on the
  same frames, their ratio, and the file sizes (what the served model would weigh).

Writes ``ensemble_<dataset>.json`` and ``ensemble_<dataset>.png`` under the output folder.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from morphocam import plotting
from morphocam.atomic import atomic_write_text
from morphocam.config import option
from morphocam.engines import EngineSettings, make_runner
from morphocam.machine import cpu_name

from .inprocess import _time_loop

DEFAULT_MEMBERS = Path("results/benchmarks/accuracy/hushem/full")


@dataclass
class EnsembleBenchConfig:
    checkpoints: list[Path] = option("member checkpoints (comma-separated; default: member*/model.safetensors "
                                     f"under {DEFAULT_MEMBERS})", [])
    data_root: Optional[Path] = option("folder holding <dataset>/ (default: the members' recipe data_dir)", None)
    output_dir: Path = option("where ensemble_<dataset>.json/.png go", Path("results/benchmarks/ensemble"))
    batch: int = option("frames per call of the speed measurement", 8)
    seconds: float = option("seconds per speed measurement", 5.0)
    threads: int = option("ONNX Runtime intra-op threads (0 = all cores)", 0)

    def __post_init__(self) -> None:
        if isinstance(self.checkpoints, (str, Path)):
            self.checkpoints = [Path(self.checkpoints)]
        self.checkpoints = ([Path(p) for p in self.checkpoints]
                            or sorted(DEFAULT_MEMBERS.glob("member*/model.safetensors")))
        if len(self.checkpoints) < 2:
            raise ValueError(f"need at least 2 member checkpoints, found {[str(p) for p in self.checkpoints]}")


def shared_split(metas: list[dict], data_root: Optional[Path]):
    """The single split around the members: ``{"val": (images, labels), "test": (images, labels)}`` and
    the classes, or None when the members do not share it (other seeds or fractions, CV folds).

    Members of a cross-validated ensemble (``--member``) never saw its validation part, so the
    ensemble is compared with a single model there; the test part is scored as a released model's is.
    """
    from morphocam.export.data import dataset_root
    from morphocam.training.checkpoint import contract_of
    from morphocam.training.trainer import checkpoint_split, make_split, recipe_config

    if any(meta.get("recipe", {}).get("member") is None for meta in metas):
        return None
    # The images are decoded once (the single split's own recipe); each member's split is re-derived on them.
    single = {**metas[0], "recipe": {**metas[0]["recipe"], "member": None}}
    root = dataset_root(single, data_root, contract_of(single))
    _, folder, base = checkpoint_split(single, root)
    tests = [list(make_split(recipe_config(meta, root), folder).test) for meta in metas]
    if any(t != list(base.test) for t in tests):
        return None
    return {part: (folder.images[idx], folder.labels[idx]) for part, idx in (("val", base.val), ("test", base.test))}, \
        folder.classes


def run(cfg: EnsembleBenchConfig) -> dict:
    from morphocam.export.ensemble import load_ensemble
    from morphocam.export.onnx_export import export_onnx
    from morphocam.export.parity import torch_predict
    from morphocam.training.metrics import classification_metrics, headline

    net, metas, contract = load_ensemble(cfg.checkpoints)
    shared = shared_split(metas, cfg.data_root)
    result: dict = {"dataset": contract.dataset, "members": [str(p) for p in cfg.checkpoints], "cpu": cpu_name(),
                    "input_size": contract.height, "batch": cfg.batch, "threads": cfg.threads}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"single": Path(tmp) / "single.onnx", "ensemble": Path(tmp) / "ensemble.onnx"}
        export_onnx(net.members[0], contract, files["single"])
        export_onnx(net, contract, files["ensemble"])
        result["bytes"] = {k: f.stat().st_size for k, f in files.items()}
        settings = EngineSettings(threads=cfg.threads)
        runners = {k: make_runner(f, settings) for k, f in files.items()}
        if shared is not None:
            parts, classes = shared
            result["accuracy"] = {}
            for part, (images, labels) in parts.items():
                member_probs = [torch_predict(m, images, contract)[1] for m in net.members]
                probs = runners["ensemble"](images)[1]
                if part == "test":
                    result["parity_max_abs_prob_diff"] = float(np.max(np.abs(probs - np.mean(member_probs, axis=0))))
                ens = classification_metrics(labels, probs, classes)
                result["accuracy"][part] = {
                    "n": ens["n"], "ensemble": headline(ens),
                    "members": [headline(classification_metrics(labels, p, classes)) for p in member_probs]}
            frames = parts["test"][0]
        else:
            from morphocam.export.parity import synthetic_frames

            result["accuracy"] = None
            result["accuracy_note"] = ("the members are not one cross-validated ensemble on one single split "
                                       "(--member runs of one seed): no image is unseen by all of them")
            frames = synthetic_frames(contract)
        frames = np.resize(frames, (max(cfg.batch, 1),) + frames.shape[1:])[: cfg.batch]
        speed = {k: _time_loop(lambda r=r: r(frames), cfg.seconds, cfg.batch) for k, r in runners.items()}
    result["images_per_s"] = speed
    result["cost_ratio"] = speed["single"] / speed["ensemble"]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"ensemble_{contract.dataset}.json", json.dumps(result, indent=2) + "\n")
    plot(result, out / f"ensemble_{contract.dataset}.png")
    print(f"[ensemble] {len(cfg.checkpoints)} members on {result['cpu']}: "
          f"{speed['single']:.1f} -> {speed['ensemble']:.1f} img/s (cost x{result['cost_ratio']:.2f}), "
          f"{result['bytes']['single'] / 1e6:.1f} -> {result['bytes']['ensemble'] / 1e6:.1f} MB"
          + "".join(f"; {part} accuracy {r['members'][0]['accuracy']:.4f} (member 0) -> "
                    f"{r['ensemble']['accuracy']:.4f}" for part, r in (result["accuracy"] or {}).items()), flush=True)
    return result


def plot(result: dict, path: Path) -> None:
    fig, (ax_acc, ax_speed) = plotting.subplots(1, 2, figsize=(10, 4))
    if result["accuracy"]:
        rows = result["accuracy"]["test"]["members"] + [result["accuracy"]["test"]["ensemble"]]
        names = [f"member {i}" for i in range(len(rows) - 1)] + ["ensemble"]
        err = [[r["accuracy"] - r["accuracy_ci95"][0] for r in rows], [r["accuracy_ci95"][1] - r["accuracy"] for r in rows]]
        ax_acc.bar(names, [r["accuracy"] for r in rows], yerr=err, capsize=3,
                   color=["tab:blue"] * (len(rows) - 1) + ["tab:orange"])
        ax_acc.set_ylim(0, 1)
        ax_acc.tick_params(axis="x", rotation=30)
    ax_acc.set_title(f"{result['dataset']}: test accuracy (95% CI)")
    ax_speed.bar(list(result["images_per_s"]), list(result["images_per_s"].values()), color=["tab:blue", "tab:orange"])
    ax_speed.set_title(f"ONNX Runtime, batch {result['batch']}: img/s\n{result['cpu']}", fontsize=9)
    plotting.save(fig, path)
