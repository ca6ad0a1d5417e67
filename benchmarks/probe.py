"""Linear probe of frozen ImageNet features: a cheap screen of backbone weights before a full CV.

One fine-tuning cross-validation of HuSHem at the paper's budget costs about two hours on two CPU
cores; this costs about a minute per backbone. Each image's pooled final feature map is taken under
the eight exact dihedral views (right-angle turns x mirror: sperm heads lie at any angle), and a
logistic regression (scikit-learn) is fitted per fold on the views of its training images. Its
regularisation C is chosen on the folds' validation images (pooled), then the probe is refitted on
train + validation and scored once on the test fold, the eight views' probabilities averaged. The
folds are the accuracy benchmark's (same seed, same duplicate grouping), so the figures sit beside
the fine-tuned CV's fold by fold.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morphocam import plotting
from morphocam.atomic import atomic_write_text
from morphocam.config import config_to_dict, option
from morphocam.datasets import datasets_root
from morphocam.machine import cpu_name


@dataclass
class ProbeConfig:
    """Options of ``morphocam-bench probe``."""

    data_root: Path = option("folder holding the datasets (default: $MORPHOCAM_DATA, else ../shared/datasets)",
                             datasets_root())
    dataset: str = option("dataset to probe", "hushem")
    weights: tuple[str, ...] = option("weights to compare: offline ImageNet lite0, lite1, lite2, or the path of a "
                                      "morphocam checkpoint (its backbone, e.g. a model fine-tuned on another "
                                      "sperm dataset)", ("lite0", "lite1", "lite2"))
    input_size: int = option("input side in pixels", 224)
    folds: int = option("k of the cross-validation (the accuracy benchmark's folds)", 5)
    seed: int = option("seed of the folds", 42)
    c_grid: tuple[float, ...] = option("inverse regularisation strengths tried on validation", (0.01, 0.1, 1.0))
    threads: int = option("torch CPU threads (0 = torch default)", 0)
    output_dir: Path = option("results folder", Path("results/benchmarks/probe"))


def dihedral_features(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """N x 8 x C pooled features of the frozen backbone, one row per dihedral view."""
    import torch

    from morphocam.training.trainer import DIHEDRAL_VIEWS, dihedral_view, to_model_input

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = to_model_input(torch.from_numpy(images[start:start + batch]).permute(0, 3, 1, 2), torch.device("cpu"))
            views = [model.features(dihedral_view(x, v).contiguous(memory_format=torch.channels_last)).mean((2, 3))
                     for v in range(DIHEDRAL_VIEWS)]
            out.append(torch.stack(views, 1).numpy())
    return np.concatenate(out)


def _fit_score(feats: np.ndarray, labels: np.ndarray, fit_idx: np.ndarray, score_idx: np.ndarray, c: float) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    views, dim = feats.shape[1], feats.shape[2]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
    clf.fit(feats[fit_idx].reshape(-1, dim), np.repeat(labels[fit_idx], views))
    probs = clf.predict_proba(feats[score_idx].reshape(-1, dim)).reshape(len(score_idx), views, -1).mean(1)
    return float(np.mean(probs.argmax(1) == labels[score_idx]))


def probe_weights(cfg: ProbeConfig, name: str) -> dict:
    """One backbone: validation accuracy per C, the chosen C, test accuracy per fold."""
    import torch

    from morphocam.training.config import TrainConfig
    from morphocam.training.trainer import build_for, load_dataset, make_split

    from morphocam.training.checkpoint import read_metadata
    from morphocam.training.pretrained import LITE_PACKAGES

    # a named ImageNet package, or a morphocam checkpoint whose metadata names its architecture
    arch = LITE_PACKAGES[name][0] if name in LITE_PACKAGES else read_metadata(Path(name))["arch"]
    tcfg = TrainConfig(data_dir=cfg.data_root / cfg.dataset, dataset=cfg.dataset, arch=arch,
                       pretrained=name, input_size=cfg.input_size, seed=cfg.seed, folds=cfg.folds, fold=0,
                       progress=False)
    folder = load_dataset(tcfg)
    model, weights = build_for(tcfg, len(folder.classes))
    t0 = time.time()
    feats = dihedral_features(model, folder.images)
    seconds = time.time() - t0
    labels = folder.labels
    splits = []
    for f in range(cfg.folds):
        tcfg.fold = f
        splits.append(make_split(tcfg, folder))
    # C by pooled validation accuracy (validation-sized weights), never by the test folds
    val = {c: float(np.average([_fit_score(feats, labels, s.train, s.val, c) for s in splits],
                               weights=[len(s.val) for s in splits])) for c in cfg.c_grid}
    best_c = max(cfg.c_grid, key=lambda c: (val[c], -c))
    test = [_fit_score(feats, labels, np.concatenate([s.train, s.val]), s.test, best_c) for s in splits]
    n_test = [len(s.test) for s in splits]
    label = name if name in LITE_PACKAGES else f"{read_metadata(Path(name))['contract'].get('dataset', '?')} model"
    return {"weights": weights, "label": label, "arch": tcfg.arch, "val_accuracy_by_c": {str(c): v for c, v in val.items()},
            "c": best_c, "test_accuracy_per_fold": test, "n_test_per_fold": n_test,
            "test_accuracy_mean": float(np.mean(test)), "test_accuracy_std": float(np.std(test, ddof=1)),
            "pooled_test_correct": int(round(sum(a * n for a, n in zip(test, n_test)))),
            "feature_seconds": seconds, "images": int(len(labels))}


def run(cfg: ProbeConfig) -> dict:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = {"config": config_to_dict(cfg),
              "cpu": cpu_name(), "probes": {}}
    for name in cfg.weights:
        r = probe_weights(cfg, name)
        result["probes"][name] = r
        print(f"{cfg.dataset} {name}: C={r['c']} (val {r['val_accuracy_by_c'][str(r['c'])]:.3f}), test "
              f"{r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f} over {cfg.folds} folds "
              f"({r['pooled_test_correct']}/{r['images']}); features {r['feature_seconds']:.0f} s", flush=True)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output_dir / f"probe_{cfg.dataset}.json", json.dumps(result, indent=2) + "\n")
    plot(result, cfg.output_dir / f"probe_{cfg.dataset}.png")
    return result


def plot(result: dict, path: Path) -> None:
    names = list(result["probes"])
    fig, ax = plotting.subplots(figsize=(5, 3.5))
    means = [result["probes"][n]["test_accuracy_mean"] for n in names]
    stds = [result["probes"][n]["test_accuracy_std"] for n in names]
    ax.bar([result["probes"][n].get("label", n) for n in names], means, yerr=stds, capsize=4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (mean ± std over folds)")
    ax.set_title(f"{result['config']['dataset']}: linear probe of frozen features, 8 views")
    plotting.save(fig, path)
