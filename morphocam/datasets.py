"""Where the public datasets live: one rule for training, export and the benchmarks.

``$MORPHOCAM_DATA`` when it is set, otherwise ``../shared/datasets`` beside the project checkout.
Each dataset is a class-per-folder tree under it (``<root>/hushem/<class>/<image>``).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MORPHOCAM_DATA"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def datasets_root() -> Path:
    """The folder holding one sub-folder per dataset."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "datasets"


def dataset_dir(name: str) -> Path:
    """The class-per-folder root of one dataset, e.g. ``dataset_dir("hushem")``."""
    return datasets_root() / name.lower()
