"""The model contract: one definition of what goes into and comes out of every morphocam model.

Training writes it into checkpoints, export writes it into the Triton model repository
(`config.pbtxt`, labels file, model card), serving and clients read it back from there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

# ImageNet statistics: the backbones are ImageNet-pretrained (paper, section 2.1).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# EfficientNet-B0's native resolution; the paper's extracted text lost the size.
DEFAULT_INPUT_SIZE = 224

# Tensor names on the wire (KServe v2 / Triton). Normalisation happens inside the graph, so the
# client sends the frame as a camera gives it: uint8 RGB, NHWC.
INPUT_NAME = "IMAGES"
INPUT_DTYPE = "UINT8"
OUTPUT_PROBABILITIES = "PROBABILITIES"
OUTPUT_LOGITS = "LOGITS"
# Trust outputs (computed inside the same graph, so every engine returns them): PROBABILITIES are
# temperature-calibrated; OOD_SCORE FP32 [n, 1] (1.0 = the in-domain threshold, higher = less like
# the training data); IN_DOMAIN BOOL [n, 1] (OOD_SCORE <= 1); PREDICTION_SET BOOL [n, K] (split-
# conformal APS set at the coverage in the model card). Clients reading only PROBABILITIES are unaffected.
OUTPUT_OOD_SCORE = "OOD_SCORE"
OUTPUT_IN_DOMAIN = "IN_DOMAIN"
OUTPUT_PREDICTION_SET = "PREDICTION_SET"
TRUST_OUTPUTS = (OUTPUT_OOD_SCORE, OUTPUT_IN_DOMAIN, OUTPUT_PREDICTION_SET)

# Explanation model: same input, plus an optional target class per frame (-1 = predicted class).
EXPLAIN_SUFFIX = "_explain"
EXPLAIN_TARGET = "TARGET_CLASS"
EXPLAIN_HEATMAP = "HEATMAP"
EXPLAIN_OVERLAY_PNG = "OVERLAY_PNG"

# How a classifier folder can be served. ``config.pbtxt`` is Triton's own ONNX Runtime backend
# (``platform: "onnxruntime_onnx"``, the same file NGC's Triton runs); ``configs/<name>.pbtxt`` are the
# Python-backend alternatives (``1/model.py`` running ONNX Runtime or OpenVINO in a stub process),
# chosen at serve time with Triton's ``--model-config-name`` (models without that file, e.g. the
# explainers, keep their ``config.pbtxt``).
NATIVE_ENGINE = "native"
PYTHON_ENGINES = ("python-ort", "openvino")
CLASSIFIER_ENGINES = (NATIVE_ENGINE, *PYTHON_ENGINES)

# Class order per dataset. The order is the index of the output vector, forever: changing it is a
# new model, not a new version.
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "smids": ("Normal_Sperm", "Abnormal_Sperm", "Non-Sperm"),
    "hushem": ("Normal", "Tapered", "Pyriform", "Amorphous"),
}

# Which class counts as a normal form, and which (if any) is not a cell at all; used by reports.
NORMAL_CLASSES = {"Normal_Sperm", "Normal"}
NON_CELL_CLASSES = {"Non-Sperm"}


MODEL_PREFIX = "morphocam_"


def model_name_for(dataset: str) -> str:
    """Triton model name for a dataset, e.g. ``morphocam_smids``."""
    return f"{MODEL_PREFIX}{dataset.lower()}"


def dataset_for_model(model: str) -> str:
    """The dataset a served model name stands for (the inverse of :func:`model_name_for`):
    ``morphocam_smids`` and ``morphocam_smids_explain`` -> ``smids``; other names come back unchanged."""
    return model.removesuffix(EXPLAIN_SUFFIX).removeprefix(MODEL_PREFIX)


def explain_model_for(model: str) -> str:
    """The explanation model that belongs to a classifier: ``morphocam_smids`` -> ``morphocam_smids_explain``
    (an explanation model's own name is returned as it is)."""
    return model.removesuffix(EXPLAIN_SUFFIX) + EXPLAIN_SUFFIX


@dataclass(frozen=True)
class InputContract:
    """Everything a client or exporter must know to feed a model."""

    classes: tuple[str, ...]
    height: int = DEFAULT_INPUT_SIZE
    width: int = DEFAULT_INPUT_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dataset: str = ""

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names must be unique, got {list(self.classes)}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean/std must be 3 values each, std > 0")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise KeyError(f"unknown class {name!r}; this model knows {list(self.classes)}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "InputContract":
        missing = {"classes"} - set(data)
        if missing:
            raise ValueError(f"contract metadata lacks {sorted(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("classes", "mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "InputContract":
        return cls.from_dict(json.loads(Path(path).read_text()))
