"""Shared pytest fixtures: where the real datasets and the released artefacts are.

The suite runs on the real datasets (``../shared/datasets`` or ``$MORPHOCAM_DATA``) and the committed
artefacts. When one is missing, the tests that need it FAIL with what is missing and where it was
looked for, so that a clone without the data cannot pass CI with half the suite quietly skipped.
Set ``MORPHOCAM_ALLOW_MISSING_DATA=1`` to skip those tests instead (the skip reasons are listed at the
end of the run: ``-ra`` is in pytest's addopts).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


ALLOW_MISSING_DATA_ENV = "MORPHOCAM_ALLOW_MISSING_DATA"


def datasets_root() -> Path:
    return Path(os.environ.get("MORPHOCAM_DATA", REPO_ROOT.parent / "shared" / "datasets"))


def missing_data(what: str) -> None:
    """Fail (or, with MORPHOCAM_ALLOW_MISSING_DATA=1, skip) the current test: ``what`` is missing."""
    if os.environ.get(ALLOW_MISSING_DATA_ENV) == "1":
        pytest.skip(f"{what} ({ALLOW_MISSING_DATA_ENV}=1)")
    pytest.fail(f"{what}. The suite needs it; set {ALLOW_MISSING_DATA_ENV}=1 to skip the tests that need it "
                "instead", pytrace=False)


def pytest_report_header(config):
    root = datasets_root()
    found = [name for name in ("hushem", "smids") if (root / name).is_dir()]
    return (f"morphocam datasets: {root} ({', '.join(found) or 'NOT FOUND'}); "
            f"{ALLOW_MISSING_DATA_ENV}={os.environ.get(ALLOW_MISSING_DATA_ENV, '0')}")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def hushem_dir() -> Path:
    path = datasets_root() / "hushem"
    if not path.is_dir():
        missing_data(f"HuSHem dataset not found at {path} (set MORPHOCAM_DATA to the folder holding hushem/)")
    return path


@pytest.fixture(scope="session")
def smids_dir() -> Path:
    path = datasets_root() / "smids"
    if not path.is_dir():
        missing_data(f"SMIDS dataset not found at {path} (set MORPHOCAM_DATA to the folder holding smids/)")
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
        missing_data(f"released HuSHem checkpoint not found at {checkpoint} (committed; or run morphocam-train)")
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
