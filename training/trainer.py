"""The paper's recipe: freeze-then-unfreeze, AdamW + cosine annealing, cross-entropy, MixUp.

``train(cfg)`` runs one configuration end to end: load and split the data, build the network,
train with best-by-validation-macro-F1 selection, evaluate on the test split, and write the
checkpoint, the resolved config, ``metrics.json`` and the plots into ``cfg.output_dir``.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from morphocam.atomic import atomic_write_text
from morphocam.config import config_to_dict, save_config
from morphocam.machine import cpu_name
from morphocam.contract import DATASET_CLASSES, IMAGENET_MEAN, IMAGENET_STD, InputContract

from . import metrics as M
from .augment import BatchAugment, mixup, soft_cross_entropy, train_transform
from .checkpoint import code_version, save_checkpoint
from .config import TrainConfig
from .data import ImageFolder, Split, group_ids, kfold_indices, load_images, member_indices, split_indices
from .model import MorphoNet, build_model
from .pretrained import load_backbone_weights
from .run_state import STATE_FILE, RunState, load_state, restore_rng, save_state
from .state_carry import discard as discard_carry, restore as restore_carry


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_model_input(batch_uint8_nchw: torch.Tensor, device: torch.device, augment=None) -> torch.Tensor:
    """uint8 NCHW -> normalised float NCHW (the same arithmetic the exported graph does); ``augment``
    (a :class:`BatchAugment`) acts on the [0, 1] images on ``device`` before they are normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = batch_uint8_nchw.to(device, non_blocking=True).float() / 255.0
    if augment is not None:
        x = augment(x)
    x = (x - mean) / std
    # channels-last runs depthwise convolutions about 2x faster on CPU (measured, README)
    return x.contiguous(memory_format=torch.channels_last)


class AugmentedImages(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # N x 3 x H x W uint8, a view
        self.labels = torch.from_numpy(labels)
        self.transform = train_transform() if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]


DIHEDRAL_VIEWS = 8


def dihedral_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0..7) of a square NCHW batch: ``view % 4`` quarter turns, mirrored when ``view >= 4``.

    Sperm heads lie at any angle, and these eight views are exact on the pixel grid (no resampling)."""
    x = torch.rot90(x, view % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if view >= 4 else x


@torch.no_grad()
def predict_probs(model: MorphoNet, images: np.ndarray, device: torch.device, batch_size: int = 64,
                  tta: bool = False) -> np.ndarray:
    """Softmax probabilities; with ``tta`` the mean over the eight :func:`dihedral_view` views."""
    model.eval()
    views = range(DIHEDRAL_VIEWS) if tta else range(1)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2)
        x = to_model_input(chunk, device)
        probs = sum(F.softmax(model(dihedral_view(x, v).contiguous(memory_format=torch.channels_last)), dim=1)
                    for v in views) / len(views)
        out.append(probs.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), np.float32)


def set_stage(model: MorphoNet, stage: int) -> list[torch.nn.Parameter]:
    """Stage 1: only the head trains (backbone and CBAM frozen, BatchNorm statistics too); stage 2: all."""
    frozen = stage == 1
    for p in model.body_parameters():
        p.requires_grad_(not frozen)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def augments_on_device(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training images are augmented in one batched pass on ``device`` (else per image in the loader)."""
    if not cfg.augment:
        return False
    return cfg.augment_on == "device" or (cfg.augment_on == "auto" and device.type == "cuda")


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for the training step where asked (``auto``: CUDA only), else a no-op context."""
    on = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


def train_one_epoch(model: MorphoNet, loader, optimizer, scheduler, cfg: TrainConfig, stage: int,
                    num_classes: int, device: torch.device, desc: str, ema=None, step: int = 0) -> float:
    model.train()
    augment = BatchAugment() if augments_on_device(cfg, device) else None
    if stage == 1:
        model.features.eval()
        model.attention.eval()
    total, count = 0.0, 0
    iterator = loader
    if cfg.progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc=desc, leave=False)
    for images, labels in iterator:
        x = to_model_input(images, device, augment)
        labels = labels.to(device)
        x, targets = mixup(x, labels, num_classes, cfg.mixup_alpha, cfg.label_smoothing)
        with autocast(cfg, device):
            if stage == 1:
                with torch.no_grad():  # frozen body: no activations kept for backward
                    fmap = model.forward_features(x)
                logits = model.forward_head(fmap)
            else:
                logits = model(x)
        loss = soft_cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if ema is not None:
            ema.update(model, step=step)
        total += float(loss.detach()) * len(labels)
        count += len(labels)
    return total / max(count, 1)


def make_split(cfg: TrainConfig, folder: ImageFolder) -> Split:
    labels, groups = folder.labels, group_ids(folder.samples)
    if cfg.member is not None:
        return member_indices(labels, groups, cfg.seed, cfg.members, cfg.member, cfg.val_frac, cfg.test_frac)
    if cfg.fold is None:
        return split_indices(labels, groups, cfg.seed, cfg.val_frac, cfg.test_frac)
    return kfold_indices(labels, groups, cfg.seed, cfg.folds, cfg.fold, cfg.val_frac)


def load_dataset(cfg: TrainConfig) -> ImageFolder:
    classes = DATASET_CLASSES.get(cfg.dataset)
    return load_images(cfg.data_dir, classes, cfg.input_size, cfg.limit_per_class, cfg.seed,
                       drop_conflicts=not cfg.keep_conflicting_duplicates, progress=cfg.progress)


def build_for(cfg: TrainConfig, num_classes: int) -> tuple[MorphoNet, str]:
    model = build_model(cfg.arch, num_classes, use_cbam=cfg.cbam, dropout=cfg.dropout,
                        pretrained_timm=(cfg.pretrained == "timm" and cfg.arch != "simplecnn"))
    weights = load_backbone_weights(model, cfg.arch, cfg.pretrained)
    return model, weights


def make_ema(model: MorphoNet, cfg: TrainConfig):
    """timm's ModelEmaV3 with warm-up (the average starts short and lengthens to ``ema_decay``:
    HuSHem runs take only a few hundred optimiser steps), or None."""
    if cfg.ema_decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)


def plan_stages(cfg: TrainConfig) -> list[tuple[int, int, float]]:
    """(stage, epochs, learning rate) in order: head-only then all, or all from the start."""
    if cfg.freeze_unfreeze:
        return [(1, cfg.frozen_epochs, cfg.lr_head), (2, cfg.epochs, cfg.lr)]
    return [(2, cfg.frozen_epochs + cfg.epochs, cfg.lr)]


def prepare_data(cfg: TrainConfig):
    """Images, split and the shuffling loader (with its own seeded generator, saved on resume)."""
    folder = load_dataset(cfg)
    split = make_split(cfg, folder)
    print(f"[data] {cfg.data_dir}: {len(folder.samples)} images, classes {list(folder.classes)}; "
          f"split {split.counts()}; {folder.merged_groups} duplicate groups kept together; "
          f"{len(folder.dropped_conflicts)} images dropped as conflicting duplicates")
    device = pick_device(cfg.device)
    on_loader = cfg.augment and not augments_on_device(cfg, device)
    train_set = AugmentedImages(folder.images[split.train], folder.labels[split.train], on_loader)
    gen = torch.Generator().manual_seed(cfg.init_seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                         drop_last=len(train_set) > cfg.batch_size,
                                         pin_memory=device.type == "cuda")
    return folder, split, loader, gen


def validate(model: MorphoNet, images: np.ndarray, labels: np.ndarray, device: torch.device) -> dict:
    vp = predict_probs(model, images, device)
    loss = float(F.nll_loss(torch.log(torch.from_numpy(vp).clamp_min(1e-12)), torch.from_numpy(labels)))
    return {"val_loss": loss, "val_accuracy": float((vp.argmax(1) == labels).mean()),
            "val_macro_f1": M.macro_f1_of_probs(labels, vp)}


def fit(cfg: TrainConfig, model: MorphoNet, ema, loader, gen: torch.Generator, val_images: np.ndarray,
        val_labels: np.ndarray, k: int, device: torch.device, run: RunState, resumed: dict | None) -> RunState:
    """The epoch loop over both stages, saving ``train_state.pt`` after every epoch.

    Selection: best validation macro-F1 (ties: lower validation loss) of the evaluated weights
    (the EMA average when on). ``resumed`` carries the optimiser/scheduler state of the stage the
    stopped run was in."""
    evaluated = ema.module if ema is not None else model
    # The stage whose optimiser/scheduler the saved state holds, fixed before the loop: run.stage_index moves
    # on when a stage ends, and the next stage's fresh optimiser must not be handed the previous one's state.
    resume_stage = run.stage_index if resumed is not None and resumed.get("optimizer") is not None else None
    for si, (stage, n_epochs, lr) in enumerate(plan_stages(cfg)):
        if si < run.stage_index or n_epochs == 0:
            continue
        params = set_stage(model, stage)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, n_epochs * len(loader)))
        if si == resume_stage:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
        for e in range(run.epoch_in_stage, n_epochs):
            te = time.time()
            train_loss = train_one_epoch(model, loader, optimizer, scheduler, cfg, stage, k, device,
                                         f"epoch {run.epoch + 1} (stage {stage})", ema, run.global_step)
            run.global_step += len(loader)
            run.epoch += 1
            v = validate(evaluated, val_images, val_labels, device)
            seconds = time.time() - te
            run.history.append({"epoch": run.epoch, "stage": stage, "train_loss": train_loss, **v,
                                "seconds": seconds})
            improved = v["val_macro_f1"] > run.best_macro_f1 or (
                v["val_macro_f1"] == run.best_macro_f1 and v["val_loss"] < run.best_loss)
            if improved:
                run.best_macro_f1, run.best_loss, run.best_epoch = v["val_macro_f1"], v["val_loss"], run.epoch
                run.best_state = copy.deepcopy(evaluated.state_dict())
            run.seconds += seconds
            last_of_stage = e + 1 == n_epochs
            run.stage_index, run.epoch_in_stage = (si + 1, 0) if last_of_stage else (si, e + 1)
            save_state(cfg.output_dir, run, model, ema, None if last_of_stage else optimizer,
                       None if last_of_stage else scheduler, gen)
            print(f"epoch {run.epoch:3d} stage {stage} train_loss {train_loss:.4f} val_loss {v['val_loss']:.4f} "
                  f"val_acc {v['val_accuracy']:.4f} val_f1 {v['val_macro_f1']:.4f} {seconds:.1f}s"
                  f"{' *' if improved else ''}", flush=True)
        run.epoch_in_stage = 0
    return run


def restore(cfg: TrainConfig, model: MorphoNet, ema, gen: torch.Generator) -> tuple[RunState, dict | None]:
    """A fresh :class:`RunState`, or the stopped run's state loaded into model, EMA and RNGs."""
    if cfg.resume is None:
        return RunState(), None
    payload = load_state(cfg.resume)
    model.load_state_dict(payload["model"])
    if ema is not None:
        ema.module.load_state_dict(payload["ema"])
    restore_rng(payload["rng"], gen)
    run = payload["run"]
    print(f"[resume] {cfg.resume}: {run.epoch} epochs done, continuing at stage index {run.stage_index}, "
          f"epoch {run.epoch_in_stage} of that stage", flush=True)
    return run, payload


def train(cfg: TrainConfig) -> dict:
    """Train one configuration end to end (or continue it with ``cfg.resume``); see the module docstring."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.init_seed)
    device = pick_device(cfg.device)
    if device.type == "cuda":
        # Autotuning pays back only on long runs: on the H200 the first epoch of each stage took 22-42 s with
        # it (SMIDS; later epochs 2.5-5 s) against 3-12 s without (HuSHem) -- a HuSHem run's whole budget is
        # ~50 s. Off by default (cuDNN's heuristics pick); --cudnn-benchmark for long runs.
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    out = cfg.output_dir
    if cfg.resume is not None and Path(cfg.resume).resolve() != out.resolve():
        raise ValueError(f"--resume {cfg.resume} must be the run's own output folder ({out})")
    if cfg.resume is not None and not restore_carry(out):  # a committed carry stands in for a lost state file
        raise FileNotFoundError(f"{out / STATE_FILE} not found: nothing to resume"
                                + (" (the run already finished: metrics.json is there)"
                                   if (out / "metrics.json").is_file() else " (no epoch finished yet)"))
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume is None:
        save_config(cfg, out / "config.yaml")

    folder, split, loader, gen = prepare_data(cfg)
    k = len(folder.classes)
    model, weights = build_for(cfg, k)
    model.to(device, memory_format=torch.channels_last)
    ema = make_ema(model, cfg)
    print(f"[model] {cfg.arch} + {'CBAM' if cfg.cbam else 'no CBAM'}, weights: {weights}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, device {device}"
          f"{f', EMA {cfg.ema_decay}' if ema is not None else ''}")
    run, resumed = restore(cfg, model, ema, gen)
    val_images, val_labels = folder.images[split.val], folder.labels[split.val]
    run = fit(cfg, model, ema, loader, gen, val_images, val_labels, k, device, run, resumed)
    # The last epoch's weights are scored too and reported beside the selected ones (never used for
    # selection): with validation sets of 26-33 images, whether best-by-validation beats simply taking
    # the end of the schedule is itself a question for the cross-validation to answer.
    last = ema.module if ema is not None else model
    last_probs = {part: predict_probs(last, folder.images[idx], device) for part, idx in
                  (("val", split.val), ("test", split.test))}
    model.load_state_dict(run.best_state)
    return finish(cfg, model, folder, split, weights, run, device, time.time() - t0, last_probs)


def finish(cfg: TrainConfig, model: MorphoNet, folder: ImageFolder, split: Split, weights: str, run: RunState,
           device: torch.device, session_seconds: float, last_probs: dict | None = None) -> dict:
    """Score the selected weights on validation and (once) on test; write checkpoint, metrics, plots."""
    out, labels, classes = cfg.output_dir, folder.labels, folder.classes
    contract = InputContract(classes=classes, height=cfg.input_size, width=cfg.input_size, dataset=cfg.dataset)
    val_images, val_labels = folder.images[split.val], labels[split.val]
    test_probs = predict_probs(model, folder.images[split.test], device)
    val_probs = predict_probs(model, val_images, device)
    test_metrics = M.classification_metrics(labels[split.test], test_probs, classes, seed=cfg.seed)
    val_metrics = M.classification_metrics(val_labels, val_probs, classes, seed=cfg.seed)
    fingerprint = folder.fingerprint()
    result = {
        "dataset": cfg.dataset,
        "arch": cfg.arch,
        "cbam": cfg.cbam,
        "weights": weights,
        "split": split.counts(),
        "fold": cfg.fold,
        "member": cfg.member,
        "duplicate_groups_merged": folder.merged_groups,
        "dropped_conflicting": folder.dropped_conflicts,
        "best_epoch": run.best_epoch,
        "epochs_run": run.epoch,
        "ema_decay": cfg.ema_decay,
        "test": test_metrics,
        "val": val_metrics,
        "history": run.history,
        "data_fingerprint": fingerprint,
        "train_seconds": run.seconds,
        "seconds_per_epoch": run.seconds / max(run.epoch, 1),
        "session_seconds": session_seconds,
        "cpu": cpu_name(),
        "device": str(device),
        "code_version": code_version(),
    }
    if cfg.tta:
        # Reported beside the plain figures; whether a released model serves TTA is decided on "val_tta".
        result["val_tta"] = M.classification_metrics(val_labels, predict_probs(model, val_images, device, tta=True),
                                                     classes, seed=cfg.seed)
        tta_probs = predict_probs(model, folder.images[split.test], device, tta=True)
        result["test_tta"] = M.classification_metrics(labels[split.test], tta_probs, classes, seed=cfg.seed)
    for part, probs in (last_probs or {}).items():
        idx = split.val if part == "val" else split.test
        result[f"{part}_last_epoch"] = M.classification_metrics(labels[idx], probs, classes, seed=cfg.seed)
    meta = {
        "contract": contract.to_dict(),
        "arch": cfg.arch,
        "use_cbam": cfg.cbam,
        "dropout": cfg.dropout,
        "cbam_reduction": 16,
        "weights": weights,
        "recipe": config_to_dict(cfg),
        "metrics": {"test": {k2: test_metrics[k2] for k2 in ("n", "accuracy", "accuracy_ci95", "macro_f1",
                                                              "macro_f1_ci95", "macro_auc_ovr")},
                    "val_macro_f1": val_metrics["macro_f1"], "best_epoch": run.best_epoch},
        "data_fingerprint": fingerprint,
        "split": split.counts(),
        "code_version": result["code_version"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    model.cpu().to(memory_format=torch.contiguous_format)
    result["checkpoint_sha256"] = save_checkpoint(model, meta, out / "model.safetensors")
    write_split(out / "split.json", folder, split, cfg)
    np.savez_compressed(out / "test_predictions.npz", probs=test_probs, labels=labels[split.test],
                        paths=np.array([str(folder.samples[i].path.relative_to(folder.root)) for i in split.test]))
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    title = f"{cfg.dataset}: {cfg.arch}{' + CBAM' if cfg.cbam else ''}"
    M.plot_curves(run.history, out / "curves.png", title)
    M.plot_roc(labels[split.test], test_probs, classes, out / "roc.png", f"{title} (test)")
    M.plot_confusion(test_metrics, out / "confusion.png", f"{title} (test)")
    (out / STATE_FILE).unlink(missing_ok=True)  # the run is complete: metrics.json is its marker now
    discard_carry(out)
    print(f"[test] n={test_metrics['n']} accuracy {test_metrics['accuracy']:.4f} "
          f"(95% CI {test_metrics['accuracy_ci95'][0]:.3f}-{test_metrics['accuracy_ci95'][1]:.3f}) "
          f"macro-F1 {test_metrics['macro_f1']:.4f} macro-AUC {test_metrics['macro_auc_ovr']:.4f}"
          f"{(' TTA accuracy %.4f' % result['test_tta']['accuracy']) if cfg.tta else ''}; wrote {out}")
    return result


def write_split(path: Path, folder: ImageFolder, split: Split, cfg: TrainConfig) -> None:
    """Record which image went where (paths relative to the dataset root), so that the split or the
    fold assignment of a run can be audited and reused without re-deriving it."""
    def files(idx) -> list[str]:
        return [str(folder.samples[i].path.relative_to(folder.root)) for i in idx]

    record = {"seed": cfg.seed, "fold": cfg.fold, "folds": cfg.folds if cfg.fold is not None else None,
              "member": cfg.member, "members": cfg.members if cfg.member is not None else None,
              "val_frac": cfg.val_frac, "test_frac": cfg.test_frac, "counts": split.counts(),
              "train": files(split.train), "val": files(split.val), "test": files(split.test)}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def recipe_config(meta: dict, data_dir: Path, progress: bool = False) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint was trained with (its recipe), reading data from ``data_dir``."""
    recipe = {k: v for k, v in meta["recipe"].items() if k in TrainConfig.__dataclass_fields__}
    recipe.update(data_dir=Path(data_dir), progress=progress)
    return TrainConfig(**recipe)


def checkpoint_split(meta: dict, data_dir: Path, progress: bool = False) -> tuple[TrainConfig, ImageFolder, Split]:
    """Re-derive the split a checkpoint was trained on from its recipe (same seed, fractions, fold).

    Warns when the images on disk differ from those the checkpoint saw (data fingerprint).
    """
    cfg = recipe_config(meta, data_dir, progress)
    folder = load_dataset(cfg)
    if folder.fingerprint() != meta.get("data_fingerprint"):
        print("[warn] dataset fingerprint differs from the one the checkpoint was trained on; "
              "its split may not hold the same images")
    return cfg, folder, make_split(cfg, folder)


def evaluate_checkpoint(checkpoint: Path, data_dir: Path, output_dir: Path | None = None,
                        split_name: str = "test", progress: bool = True) -> dict:
    """Re-derive the checkpoint's split from its recipe and score it; warns on a data mismatch."""
    from .checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    cfg, folder, split = checkpoint_split(meta, data_dir, progress)
    idx = getattr(split, split_name)
    classes = tuple(meta["contract"]["classes"])
    probs = predict_probs(model, folder.images[idx], torch.device("cpu"))
    result = M.classification_metrics(folder.labels[idx], probs, classes, seed=cfg.seed)
    result.update(checkpoint=str(checkpoint), split_name=split_name, weights=meta.get("weights"))
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"eval_{split_name}.json", json.dumps(result, indent=2) + "\n")
        M.plot_confusion(result, out / f"eval_{split_name}_confusion.png", f"{meta['arch']} ({split_name})")
        M.plot_roc(folder.labels[idx], probs, classes, out / f"eval_{split_name}_roc.png", f"{meta['arch']} ({split_name})")
    return result
