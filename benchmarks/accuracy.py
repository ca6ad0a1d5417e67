"""Accuracy benchmark: the paper's Table 1 / ablation, and k-fold cross-validation of the full model.

Every (config, dataset, fold) is one training run in its own folder. A folder that holds
``metrics.json`` is finished and reused; one that holds ``train_state.pt`` was stopped mid-run and is
resumed from its last finished epoch (``morphocam-train --resume``); so the benchmark never retrains a
finished cell and loses at most one epoch of a stopped one. The summary compares each row with the
paper and says which backbone/weights, input size and epochs each row used.

A cell is trained under an exclusive lock on its folder (``.cell.lock``), so several benchmark processes
can share one set of cells: ``--workers N`` starts N of them, each taking the next cell no other one
holds, then summarises once they are done. One HuSHem run leaves a GPU mostly idle (batches of 32
images of 224 px), so on a GPU machine N runs side by side finish in about the time of one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from morphocam import plotting
from morphocam.atomic import atomic_write_text
from morphocam.config import config_to_dict, option, save_config
from morphocam.datasets import datasets_root

from .paper import PAPER_AUC, PAPER_TABLE, PUBLISHED_CV

# The ablation ladder of the paper, each row adding one component.
ABLATION: dict[str, dict] = {
    "simplecnn": dict(arch="simplecnn", cbam=False, pretrained="none", freeze_unfreeze=False,
                      mixup_alpha=0.0, label_smoothing=0.0),
    "efficientnet": dict(cbam=False, freeze_unfreeze=False, mixup_alpha=0.0, label_smoothing=0.0),
    "cbam": dict(cbam=True, freeze_unfreeze=False, mixup_alpha=0.0, label_smoothing=0.0),
    "freeze_unfreeze": dict(cbam=True, freeze_unfreeze=True, mixup_alpha=0.0, label_smoothing=0.0),
    "full": dict(cbam=True, freeze_unfreeze=True, mixup_alpha=0.4, label_smoothing=0.1),
}




@dataclass
class AccuracyConfig:
    data_root: Path = option("folder holding hushem/ and smids/ (default: $MORPHOCAM_DATA, else "
                             "../shared/datasets)", datasets_root())
    output_dir: Path = option("results folder (one sub-folder per run; existing runs are reused)",
                          Path("results/benchmarks/accuracy"))
    datasets: tuple[str, ...] = option("datasets to run", ("hushem",))
    configs: tuple[str, ...] = option("ablation rows to run", tuple(ABLATION))
    single_split: bool = option("run each config on the single 70/15/15 split (false: only the "
                                "cross-validation and ensemble cells, e.g. to compare a backbone by CV first)", True)
    folds: int = option("k for the cross-validation of the full model (0 = none)", 5)
    cv_config: str = option("the ablation row the k-fold cross-validation trains (the paper's recipe: full)", "full",
                            choices=tuple(ABLATION))
    cv_datasets: tuple[str, ...] = option("datasets that also get the k-fold cross-validation (an SMIDS fold "
                                          "costs as much as its whole single-split row)", ("hushem",))
    members: int = option("k for the cross-validated ensemble of the full model on the single split: k members "
                          "trained on re-divided folds of the single split's training part, probabilities "
                          "averaged, chosen on its validation part (unseen by all members), scored on its "
                          "test split (0 = none)", 0)
    member_datasets: tuple[str, ...] = option("datasets that also get the ensemble", ("hushem",))
    arch: str = option("backbone for the EfficientNet rows", "tf_efficientnet_lite0")
    pretrained: str = option("backbone weights for the EfficientNet rows", "lite0")
    input_size: int = option("input side (the paper: 224)", 224)
    frozen_epochs: int = option("stage-1 epochs (freeze-unfreeze rows)", 10)
    epochs: int = option("stage-2 epochs (rows without freezing train frozen+stage-2 epochs in total; "
                         "the paper: 100 in total)", 90)
    lr_head: float = option("stage-1 (head-only) learning rate", 3e-3)
    lr: float = option("stage-2 learning rate", 3e-4)
    lr_scratch: float = option("learning rate of the SimpleCNN trained from scratch", 1e-3)
    ema_decay: float = option("weight averaging (EMA) for every row; 0 = off", 0.0)
    seed: int = option("seed of the splits and folds (and of training, unless --train-seed)", 42)
    train_seed: Optional[int] = option("seed of initialisation and augmentation only: the same folds trained "
                                       "again with other draws (a seed ensemble, with --cv-ensemble-with)", None)
    threads: int = option("torch threads per run (0 = torch default)", 0)
    device: str = option("'cpu', 'cuda' or 'auto'", "auto")
    limit_per_class: Optional[int] = option("quick runs: at most this many images per class", None)
    cv_ensemble_with: tuple[Path, ...] = option("other accuracy output folders (same folds, other recipes or "
                                                "backbones) whose CV fold models join this one's, fold by fold, "
                                                "probabilities averaged: the CV of that ensemble, from the saved "
                                                "test predictions (nothing is retrained)", ())
    workers: int = option("benchmark processes sharing the cells (each trains the next cell no other one "
                          "holds, under a lock per cell), then one summary pass; >1 pays on a GPU machine", 1)
    train: bool = option("train the cells that are missing (false: only summarise the finished ones, e.g. "
                         "after a time-boxed run was stopped)", True)
    busy: str = option("a cell that another process is training: 'wait' for it and reuse its result, or "
                       "'skip' it (what --workers' processes do; the summary pass then collects it)", "wait",
                       choices=("wait", "skip"))


LOCK_FILE = ".cell.lock"


@contextmanager
def cell_lock(out: Path, wait: bool):
    """Hold ``out/.cell.lock`` exclusively (flock: released by the kernel if the holder dies, so a killed
    worker's cell is free again and resumes from its ``train_state.pt``). Yields False when ``wait`` is
    off and another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_config(cfg: AccuracyConfig, dataset: str, name: str, fold: int | None,
               member: int | None = None) -> dict | None:
    """The cell's result: reused, resumed or trained; None when it is unfinished and ``cfg.train`` is
    off, or when ``cfg.busy == 'skip'`` and another process is training it."""
    out = run_dir(cfg, dataset, name, fold, member)
    done = out / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    if not cfg.train:
        return None
    with cell_lock(out, wait=cfg.busy == "wait") as held:
        if not held:
            print(f"[busy] {out}: another process is training it; skipped", flush=True)
            return None
        if done.is_file():  # finished by the process we waited for
            return json.loads(done.read_text())
        return _train_cell(cfg, out, dataset, name, fold, member)


def _train_cell(cfg: AccuracyConfig, out: Path, dataset: str, name: str, fold: int | None,
                member: int | None) -> dict:
    from morphocam.training.config import TrainConfig
    from morphocam.training.trainer import train

    from morphocam.training.state_carry import restore

    if restore(out):  # its own train_state.pt, or one carried through git from an earlier session
        # A stopped cell continues with its own recipe (config.yaml), whatever this invocation's flags say.
        from morphocam.training.cli import resume_argv
        from morphocam.config import parse_config

        print(f"[resume] {out}", flush=True)
        return train(parse_config(TrainConfig, resume_argv(["--resume", str(out)]), "resume"))
    row = dict(ABLATION[name])
    arch = row.pop("arch", cfg.arch)
    pretrained = row.pop("pretrained", cfg.pretrained)
    lr = cfg.lr_scratch if arch == "simplecnn" else cfg.lr
    tcfg = TrainConfig(data_dir=cfg.data_root / dataset, dataset=dataset, output_dir=out, arch=arch,
                       pretrained=pretrained, input_size=cfg.input_size, frozen_epochs=cfg.frozen_epochs,
                       epochs=cfg.epochs, lr_head=cfg.lr_head, lr=lr, ema_decay=cfg.ema_decay, seed=cfg.seed,
                       train_seed=cfg.train_seed,
                       fold=fold, folds=max(cfg.folds, 2), member=member, members=max(cfg.members, 2),
                       threads=cfg.threads, device=cfg.device,
                       limit_per_class=cfg.limit_per_class, progress=False, **row)
    return train(tcfg)


RECIPE_KEYS = ("arch", "pretrained", "train_seed", "input_size", "frozen_epochs", "epochs", "lr_head", "lr",
               "batch_size", "mixup_alpha", "label_smoothing", "ema_decay", "augment_on", "amp")


def _recipe(run_dir: Path) -> dict:
    """The training recipe a run folder was made with (its ``config.yaml``): rows reused from an
    earlier invocation keep their own epochs and input size, whatever this invocation's flags say."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    cfg = yaml.safe_load(path.read_text()) or {}
    return {k: cfg[k] for k in RECIPE_KEYS if k in cfg}


def _row(result: dict, run_dir: Path | None = None) -> dict:
    t = result["test"]
    return {"accuracy": t["accuracy"], "accuracy_ci95": t["accuracy_ci95"], "macro_f1": t["macro_f1"],
            "macro_auc_ovr": t["macro_auc_ovr"], "n_test": t["n"], "epochs_run": result["epochs_run"],
            "train_seconds": result.get("train_seconds"), "seconds_per_epoch": result.get("seconds_per_epoch"),
            "cpu": result.get("cpu"), "device": result.get("device"),
            "accuracy_tta": result.get("test_tta", {}).get("accuracy"),
            # validation accuracy with and without TTA: the CV summary decides TTA on these, not on test
            "n_val": result.get("val", {}).get("n"), "val_accuracy": result.get("val", {}).get("accuracy"),
            "val_accuracy_tta": result.get("val_tta", {}).get("accuracy"),
            "accuracy_last_epoch": result.get("test_last_epoch", {}).get("accuracy"),
            "best_epoch": result.get("best_epoch"),
            "weights": result["weights"], "arch": result["arch"], "cbam": result["cbam"],
            "recipe": _recipe(run_dir) if run_dir is not None else {}}


def run_dir(cfg: AccuracyConfig, dataset: str, name: str, fold: int | None, member: int | None = None) -> Path:
    if member is not None:
        return cfg.output_dir / dataset / name / f"member{member}"
    return cfg.output_dir / dataset / name / ("single" if fold is None else f"fold{fold}")


def summarise_folds(rows: list[dict]) -> dict:
    acc = np.array([r["accuracy"] for r in rows])
    f1 = np.array([r["macro_f1"] for r in rows])
    # t-based 95% interval of the mean over folds
    from scipy.stats import t as student_t

    k = len(rows)
    half = lambda x: float(student_t.ppf(0.975, k - 1) * x.std(ddof=1) / math.sqrt(k)) if k > 1 else float("nan")
    return {"folds": k, "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if k > 1 else 0.0,
            "accuracy_ci95": [float(acc.mean() - half(acc)), float(acc.mean() + half(acc))],
            "macro_f1_mean": float(f1.mean()), "macro_f1_std": float(f1.std(ddof=1)) if k > 1 else 0.0,
            "macro_f1_ci95": [float(f1.mean() - half(f1)), float(f1.mean() + half(f1))],
            **_tta_on_validation(rows), "per_fold": rows}


def _tta_on_validation(rows: list[dict]) -> dict:
    """Whether test-time augmentation is used, decided on the folds' validation images pooled (TTA only if
    it is strictly better there), and the CV's test accuracy under that decision. Test accuracy with TTA is
    reported beside it, but never decides: choosing TTA because it scored better on test would leak."""
    keys = ("n_val", "val_accuracy", "val_accuracy_tta", "accuracy_tta")
    if not rows or any(r.get(k) is None for r in rows for k in keys):
        return {}
    n = sum(r["n_val"] for r in rows)
    val = sum(r["n_val"] * r["val_accuracy"] for r in rows) / n
    val_tta = sum(r["n_val"] * r["val_accuracy_tta"] for r in rows) / n
    chosen = val_tta > val
    test = [r["accuracy_tta" if chosen else "accuracy"] for r in rows]
    return {"tta": {"n_val": n, "val_accuracy": val, "val_accuracy_tta": val_tta, "chosen_on_val": chosen,
                    "accuracy_tta_mean": float(np.mean([r["accuracy_tta"] for r in rows])),
                    "accuracy_mean_as_chosen": float(np.mean(test))}}


def summarise_ensemble(run_dirs: list[Path], classes: tuple[str, ...], seed: int) -> dict:
    """The ensemble's test metrics from its members' own saved test predictions (probabilities averaged).

    Members share the single split's test images (same order), which is checked, so nothing is re-run.
    """
    from morphocam.training.metrics import classification_metrics, headline

    preds = [np.load(d / "test_predictions.npz") for d in run_dirs]
    labels, paths = preds[0]["labels"], preds[0]["paths"]
    for d, p in zip(run_dirs, preds):
        if not (np.array_equal(p["labels"], labels) and np.array_equal(p["paths"], paths)):
            raise ValueError(f"{d}: its test split differs from {run_dirs[0]}'s; members must share it")
    metrics = headline(classification_metrics(labels, np.mean([p["probs"] for p in preds], axis=0), classes,
                                              seed=seed))
    members = [float(np.mean(p["probs"].argmax(1) == labels)) for p in preds]
    n = metrics.pop("n")
    return {"members": len(preds), **metrics, "n_test": n, "member_accuracy": members,
            "member_accuracy_mean": float(np.mean(members)), "correct": int(round(metrics["accuracy"] * n))}


def _cv_config_of(output_dir: Path, dataset: str) -> str:
    """The ablation row another accuracy folder cross-validated on ``dataset`` (its ``accuracy.json``; before
    the option existed every CV trained the full recipe)."""
    path = output_dir / "accuracy.json"
    if not path.is_file():
        return "full"
    summary = json.loads(path.read_text())
    return summary.get("cross_validation", {}).get(dataset, {}).get(
        "config", summary.get("config", {}).get("cv_config", "full"))


def summarise_cv_ensemble(cfg: AccuracyConfig, dataset: str) -> dict:
    """Per CV fold, this benchmark's fold model averaged with the same fold's models of the folders in
    ``cfg.cv_ensemble_with`` (each scored the same test images: checked); folds missing anywhere are left
    out and counted. Every fold model trained without that fold's test images, so the average is a fair
    CV of the ensemble."""
    folds, missing = [], []
    for f in range(cfg.folds):
        dirs = [run_dir(cfg, dataset, cfg.cv_config, f)] + [
            Path(o) / dataset / _cv_config_of(Path(o), dataset) / f"fold{f}" for o in cfg.cv_ensemble_with]
        if not all((d / "test_predictions.npz").is_file() for d in dirs):
            missing.append(f)
            continue
        classes = tuple(json.loads((dirs[0] / "metrics.json").read_text())["test"]["classes"])
        folds.append({"fold": f, **summarise_ensemble(dirs, classes, cfg.seed)})
    out = {"members": [str(cfg.output_dir)] + [str(o) for o in cfg.cv_ensemble_with], "folds_missing": missing}
    if folds:
        out.update(summarise_folds(folds))
        out["published_cv_accuracy_mean_std"] = list(PUBLISHED_CV.get(dataset, ()))
        print(f"{dataset:7s} CV of the ensemble with {', '.join(map(str, cfg.cv_ensemble_with))}: {len(folds)} folds, "
              f"acc {out['accuracy_mean']:.4f} ± {out['accuracy_std']:.4f}, F1 {out['macro_f1_mean']:.3f}", flush=True)
    return out


def run_workers(cfg: AccuracyConfig) -> None:
    """Start ``cfg.workers`` copies of this benchmark that skip busy cells; wait for all of them.

    Each writes its log to ``<output_dir>/logs/worker-<tag>-<i>.log``, ``tag`` naming this invocation's
    settings, so that benchmarks with other flags started beside it on the same output folder (the GPU
    script's groups) neither read its workers' settings nor write into their logs. Their summaries are
    partial (the summary pass after them writes the whole one)."""
    logs = cfg.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    settings = replace(cfg, workers=1, busy="skip")
    tag = hashlib.sha1(json.dumps(config_to_dict(settings), sort_keys=True).encode()).hexdigest()[:8]
    conf = logs / f"workers-{tag}.yaml"
    save_config(settings, conf)
    procs = []
    for i in range(cfg.workers):
        path = logs / f"worker-{tag}-{i}.log"
        log = open(path, "a")
        procs.append((i, path, log, subprocess.Popen(
            [sys.executable, "-m", "morphocam.benchmarks.cli", "accuracy", "--config", str(conf)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})))
        time.sleep(2)  # staggered, so that the first cells are not all claimed in the same instant
    for i, path, log, proc in procs:
        rc = proc.wait()
        log.close()
        print(f"[worker {i}] exited with {rc} (log: {path})", flush=True)


SECTIONS = ("single_split", "cross_validation", "ensemble", "cv_ensemble")


def _landed_summary(output_dir: Path) -> dict:
    """The folder's ``accuracy.json`` as earlier invocations left it: an invocation that runs a few rows
    (one dataset, one recipe) updates those entries and keeps the others, so the file always summarises
    everything that has landed in the folder, whichever invocation trained it."""
    path = output_dir / "accuracy.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    return {section: dict(old.get(section, {})) for section in SECTIONS}


def run(cfg: AccuracyConfig) -> dict:
    """Run (or resume, or reuse) every cell; ``accuracy.json`` and the plot are rewritten after each
    finished cell, so a stopped benchmark leaves a summary of what has landed. With ``cfg.workers > 1``
    the cells are trained by that many processes first (:func:`run_workers`)."""
    if cfg.workers > 1:
        run_workers(cfg)
        cfg = replace(cfg, workers=1, busy="wait")
    summary = {"config": config_to_dict(cfg), **_landed_summary(cfg.output_dir)}
    cfg.output_dir.mkdir(parents=True, exist_ok=True)

    trained = False  # a cell this invocation trained (or resumed) since the last publish

    def cell(dataset: str, name: str, fold: int | None, member: int | None = None) -> dict | None:
        nonlocal trained
        fresh = not (run_dir(cfg, dataset, name, fold, member) / "metrics.json").is_file()
        result = run_config(cfg, dataset, name, fold, member)
        trained |= fresh and result is not None
        return result

    def publish(final: bool = False) -> None:
        nonlocal trained
        if not (trained or final):
            # a reused cell is in the file already; mid-loop, a CV or ensemble holds only the folds or
            # members reached so far, which differs from the file's complete entry and would rewrite it
            return
        trained = False
        path = cfg.output_dir / "accuracy.json"
        landed = json.loads(json.dumps({section: summary[section] for section in SECTIONS}))
        if path.is_file() and (cfg.output_dir / "accuracy.png").is_file() and landed == _landed_summary(cfg.output_dir):
            # nothing new landed: keep the file as it is, so its "config" stays the invocation that landed
            # its rows (a resumed script re-runs every step, and would otherwise rewrite every folder's file)
            return
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        plot(summary, cfg.output_dir / "accuracy.png")

    for dataset in cfg.datasets:
        for name in (cfg.configs if cfg.single_split else ()):
            result = cell(dataset, name, None)
            if result is None:
                continue
            row = _row(result, run_dir(cfg, dataset, name, None))
            paper = PAPER_TABLE[name][dataset]
            row.update(paper_accuracy=paper[0], paper_macro_f1=paper[1])
            if name == "full":  # the paper reports ROC-AUC for its full model only
                row["paper_macro_auc_ovr"] = PAPER_AUC[dataset]
            summary["single_split"].setdefault(dataset, {})[name] = row
            print(f"{dataset:7s} {name:16s} acc {row['accuracy']:.4f} (paper {paper[0]:.4f})  "
                  f"F1 {row['macro_f1']:.3f} (paper {paper[1]:.3f})  epochs {row['epochs_run']} "
                  f"at {row['recipe'].get('input_size', '?')} px", flush=True)
            publish()
        if cfg.folds > 1 and dataset in cfg.cv_datasets:
            rows = []
            for f in range(cfg.folds):
                result = cell(dataset, cfg.cv_config, f)
                if result is None:
                    continue
                rows.append(_row(result, run_dir(cfg, dataset, cfg.cv_config, f)))
                cv = summarise_folds(rows)
                cv["folds_planned"] = cfg.folds
                cv["config"] = cfg.cv_config
                if dataset in PUBLISHED_CV:
                    cv["published_cv_accuracy_mean_std"] = list(PUBLISHED_CV[dataset])
                summary["cross_validation"][dataset] = cv
                print(f"{dataset:7s} {cfg.cv_config} fold {f}: acc {rows[-1]['accuracy']:.4f}; {len(rows)}/{cfg.folds} folds: "
                      f"acc {cv['accuracy_mean']:.4f} ± {cv['accuracy_std']:.4f} "
                      f"(95% CI {cv['accuracy_ci95'][0]:.3f}-{cv['accuracy_ci95'][1]:.3f}), "
                      f"F1 {cv['macro_f1_mean']:.3f} ± {cv['macro_f1_std']:.3f}", flush=True)
                publish()
            if cfg.cv_ensemble_with:
                summary["cv_ensemble"][dataset] = summarise_cv_ensemble(cfg, dataset)
                publish()
        if cfg.members > 1 and dataset in cfg.member_datasets:
            dirs, rows = [], []
            for m in range(cfg.members):
                result = cell(dataset, "full", None, m)
                if result is None:
                    continue
                dirs.append(run_dir(cfg, dataset, "full", None, m))
                rows.append(_row(result, dirs[-1]))
                ens = summarise_ensemble(dirs, tuple(result["test"]["classes"]), cfg.seed)
                ens.update(members_planned=cfg.members, per_member=rows, paper_accuracy=PAPER_TABLE["full"][dataset][0])
                summary["ensemble"][dataset] = ens
                print(f"{dataset:7s} ensemble {len(dirs)}/{cfg.members} members: acc {ens['accuracy']:.4f} "
                      f"({ens['correct']}/{ens['n_test']}), members' mean {ens['member_accuracy_mean']:.4f}", flush=True)
                publish()
    publish(final=True)
    return summary


def plot(summary: dict, path: Path) -> None:
    """Per dataset: each single-split row beside the paper's, then the CV mean and the ensemble (95% CIs)."""
    datasets = sorted(set(summary["single_split"]) | set(summary["cross_validation"]) | set(summary.get("ensemble", {})))
    fig, axes = plotting.subplots(1, max(1, len(datasets)), figsize=(9 * max(1, len(datasets)), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        rows = summary["single_split"].get(ds, {})
        # the ablation's order, whichever invocation landed each row
        names = sorted(rows, key=lambda n: list(ABLATION).index(n) if n in ABLATION else len(ABLATION))
        x = np.arange(len(names))
        if names:
            err = np.array([[rows[n]["accuracy"] - rows[n]["accuracy_ci95"][0] for n in names],
                            [rows[n]["accuracy_ci95"][1] - rows[n]["accuracy"] for n in names]])
            # plain lists: matplotlib warns on a length-1 array of positions (NumPy >= 1.25 deprecation)
            ax.bar((x - 0.2).tolist(), [rows[n]["accuracy"] for n in names], 0.4, yerr=err.tolist(), capsize=3,
                   label="morphocam (95% CI)")
            ax.bar((x + 0.2).tolist(), [rows[n]["paper_accuracy"] for n in names], 0.4, label="paper")
        extra = []
        cv = summary["cross_validation"].get(ds)
        cv_row = (cv or {}).get("config", "full")
        if cv:
            extra.append((f"{cv_row}, {cv['folds']}-fold CV", f"{cv['folds']}-fold CV", cv["accuracy_mean"],
                          cv["accuracy_ci95"], "kD"))
            if ds in PUBLISHED_CV:
                mean, std = PUBLISHED_CV[ds]
                ax.errorbar([len(names) + 0.25], [mean], yerr=[[std], [std]], fmt="D", color="grey", capsize=3,
                            label="best published CV (mean ± std)")
        cve = summary.get("cv_ensemble", {}).get(ds)
        if cve and cve.get("folds"):
            extra.append((f"{cv_row}, {cve['folds']}-fold CV of {len(cve['members'])} runs averaged",
                          f"CV, {len(cve['members'])} runs", cve["accuracy_mean"], cve["accuracy_ci95"], "mP"))
        ens = summary.get("ensemble", {}).get(ds)
        if ens:
            extra.append((f"full, {ens['members']} members averaged", f"{ens['members']} members", ens["accuracy"],
                          ens["accuracy_ci95"], "rs"))
        for i, (label, _, value, ci, fmt) in enumerate(extra):
            lo, hi = (value, value) if any(map(math.isnan, ci)) else (max(ci[0], 0.0), min(ci[1], 1.0))
            ax.errorbar([len(names) + i], [value], yerr=[[value - lo], [hi - value]], fmt=fmt, capsize=3, label=label)
        # the long labels of the extra points live in the legend; the ticks keep short names
        ax.set_xticks(np.arange(len(names) + len(extra)), names + [e[1] for e in extra], rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{ds}: test accuracy")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    plotting.save(fig, path)


def smoke_config(tmp: Path, data_root: Path) -> AccuracyConfig:
    """A run small enough for the test suite (it checks the plumbing, not the numbers)."""
    return replace(AccuracyConfig(), data_root=data_root, output_dir=tmp, configs=("simplecnn",), folds=0, members=0,
                   input_size=64, frozen_epochs=0, epochs=1, limit_per_class=8)
