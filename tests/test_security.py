"""Security (issue 7): gRPC over TLS with a self-signed certificate made in the test, checkpoints
loaded without pickle, and logs that carry frame ids but never pixel bytes. (The tampered-ONNX
refusal is in ``test_reliability_faults.py``, on the server that also holds a broken model.)
"""

from __future__ import annotations

import base64
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from morphocam.serving.launcher import TritonServer  # noqa: E402
from test_serving import MODEL, real_frames  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARKER = b"PATIENT-4711-DOE"  # pixel bytes that must never reach a log


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "server.crt", d / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o600)
    return cert, key


@pytest.fixture(scope="module")
def tls_server(serving_repository, certificate, tmp_path_factory):
    repo = tmp_path_factory.mktemp("tls_repo")
    os.symlink(serving_repository / MODEL, repo / MODEL)
    cert, key = certificate
    log = tmp_path_factory.mktemp("tls_log") / "server.log"
    # verbose logging on purpose: even at --log-verbose=1 no pixel bytes may be logged
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=180, log_verbose=1,
                      log_file=log, grpc_ssl_cert=cert, grpc_ssl_key=key) as srv:
        yield srv


def _marker_frame(h: int, w: int) -> np.ndarray:
    raw = (MARKER * (h * w * 3 // len(MARKER) + 1))[: h * w * 3]
    return np.frombuffer(raw, np.uint8).reshape(1, h, w, 3).copy()


def test_tls_client_classifies_and_plaintext_client_fails(tls_server, certificate, serving_repository):
    from morphocam.contract import InputContract

    contract = InputContract.load(serving_repository / MODEL / "1" / "contract.json")
    frames, _ = real_frames(contract, 2)
    assert "--grpc-use-ssl=true" in tls_server.command()
    cert = certificate[0].read_bytes()
    c = grpcclient.InferenceServerClient(tls_server.grpc_url, ssl=True, root_certificates=str(certificate[0]))
    try:
        assert c.is_server_live() and c.is_model_ready(MODEL)
        inp = grpcclient.InferInput("IMAGES", list(frames.shape), "UINT8")
        inp.set_data_from_numpy(frames)
        probs = c.infer(MODEL, [inp], client_timeout=30).as_numpy("PROBABILITIES")
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    finally:
        c.close()
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----")
    plain = grpcclient.InferenceServerClient(tls_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
    finally:
        plain.close()
    # TLS without trusting the self-signed certificate fails too (no silent fallback)
    untrusted = grpcclient.InferenceServerClient(tls_server.grpc_url, ssl=True)
    try:
        with pytest.raises(InferenceServerException):
            untrusted.is_server_live(client_timeout=5)
    finally:
        untrusted.close()


def test_cli_over_tls_logs_frame_ids_but_no_pixel_bytes(tls_server, certificate, serving_repository, tmp_path):
    from morphocam.contract import InputContract

    contract = InputContract.load(serving_repository / MODEL / "1" / "contract.json")
    folder = tmp_path / "frames"
    folder.mkdir()
    frame = _marker_frame(contract.height, contract.width)[0]
    names = [f"slide7_frame{i:03d}.png" for i in range(3)]
    for name in names:
        Image.fromarray(frame).save(folder / name)
    out = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, "-m", "morphocam.clients.classify_cli", "--no-progress", "--url", tls_server.grpc_url,
                           "--model", MODEL, "--ssl", "--root-certificates", str(certificate[0]), "--output",
                           str(out), str(folder)], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    text = out.read_bytes()
    assert all(name.encode() in text for name in names)
    assert b'"status":"ok"' in text.replace(b" ", b"")
    server_log = tls_server.log_path.read_bytes()
    assert b"infer" in server_log.lower() or b"request" in server_log.lower()  # verbose log really logged requests
    forbidden = [MARKER, MARKER[:8], base64.b64encode(MARKER * 3)[:16], MARKER.hex().encode()[:16]]
    for blob, what in ((server_log, "server log"), (proc.stderr, "client stderr"), (proc.stdout, "client stdout"),
                       (text, "results file")):
        for f in forbidden:
            assert f not in blob, f"{what} contains pixel bytes {f!r}"
    print(f"server log {len(server_log)} bytes at --log-verbose=1, results {len(text)} bytes: no pixel bytes")


def test_plaintext_cli_against_tls_server_fails_fast(tls_server, tmp_path):
    sample = sorted((REPO / "samples" / "hushem").glob("*.BMP"))[:1]
    proc = subprocess.run([sys.executable, "-m", "morphocam.clients.classify_cli", "--no-progress", "--url", tls_server.grpc_url,
                           "--model", MODEL, "--timeout", "3", "--retry-deadline", "5", "--output",
                           str(tmp_path / "r.jsonl"), *map(str, sample)], cwd=REPO, capture_output=True, text=True,
                          timeout=90)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]


# ------------------------------------------------------------------ no pickle
class _Payload:
    def __reduce__(self):
        return (Path.write_text, (Path(os.environ["MORPHOCAM_PWNED"]), "pwned"))


def test_pickled_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    from morphocam.training.checkpoint import CheckpointError, load_checkpoint, read_metadata

    flag = tmp_path / "pwned"
    monkeypatch.setenv("MORPHOCAM_PWNED", str(flag))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps({"state_dict": _Payload()}))
    for loader in (read_metadata, lambda p: load_checkpoint(p, verify=False)):
        with pytest.raises(CheckpointError):
            loader(bad)
    assert not flag.exists(), "loading a checkpoint executed pickled code"


def test_no_pickle_loading_in_project_code():
    """Static guard: no ``pickle.load``, no ``torch.load`` without ``weights_only=True``, no
    ``allow_pickle=True`` in the code that loads checkpoints, graphs and results."""
    offenders = []
    for folder in ("morphocam", "training", "export", "serving", "clients", "benchmarks"):
        for py in (REPO / folder).rglob("*.py"):
            for n, line in enumerate(py.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"pickle\.loads?\(|allow_pickle\s*=\s*True|cloudpickle|dill\.load", code):
                    offenders.append(f"{py.relative_to(REPO)}:{n}: {line.strip()}")
                if "torch.load(" in code and "weights_only=True" not in code:
                    offenders.append(f"{py.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders
