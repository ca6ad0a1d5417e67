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


# ---------------------------------------------------------------- serving (real Triton server)
def serving_checkpoint_path() -> Path:
    """The released HuSHem checkpoint: the served-model tests use the real trained network."""
    return REPO_ROOT / "results" / "training" / "hushem" / "model.safetensors"


@pytest.fixture(scope="session")
def serving_repository(tmp_path_factory) -> Path:
    """A model repository in the agreed layout, built from the serving checkpoint."""
    checkpoint = serving_checkpoint_path()
    if not checkpoint.is_file():
        pytest.skip(f"no checkpoint at {checkpoint} (run morphocam-train)")
    from morphocam.export.config import ExportConfig
    from morphocam.export.repository import write_repository

    out = tmp_path_factory.mktemp("model_repository")
    # Fast export: FP32 ONNX Runtime, no engine measurement or INT8 calibration.
    write_repository(ExportConfig(checkpoints=[checkpoint], output=out, measure=False, int8=False,
                                  parity_images=4, progress=False))
    return out


@pytest.fixture(scope="session")
def triton_server(serving_repository):
    """The real tritonserver on free loopback ports, started once per session."""
    from morphocam.serving.launcher import TritonServer

    with TritonServer(serving_repository, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=240) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(triton_server):
    """A stock tritonclient gRPC client on the session server."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def contract(serving_repository):
    """The input contract of the served HuSHem classifier."""
    from morphocam.contract import InputContract, model_name_for

    return InputContract.load(serving_repository / model_name_for("hushem") / "1" / "contract.json")
