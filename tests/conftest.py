"""Shared pytest fixtures: where the real datasets and the released artefacts are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def datasets_root() -> Path:
    return Path(os.environ.get("MORPHOCAM_DATA", REPO_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def hushem_dir() -> Path:
    path = datasets_root() / "hushem"
    if not path.is_dir():
        pytest.skip(f"HuSHem dataset not found at {path} (set MORPHOCAM_DATA)")
    return path


@pytest.fixture(scope="session")
def smids_dir() -> Path:
    path = datasets_root() / "smids"
    if not path.is_dir():
        pytest.skip(f"SMIDS dataset not found at {path} (set MORPHOCAM_DATA)")
    return path
