"""The CASA client against the real Triton server (fixtures in conftest.py), bounded in time.

Extra servers (restart, two-server failover) serve a classifier-only copy of the session's
repository so they start fast; every server runs on free loopback ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from morphocam.contract import DATASET_CLASSES, EXPLAIN_SUFFIX

pytest.importorskip("tritonclient.grpc")

from morphocam.clients.sources import Frame, expand_inputs  # noqa: E402
from morphocam.clients.streaming import classify_frames  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
MODEL = "morphocam_hushem"
HUSHEM = DATASET_CLASSES["hushem"]


def sample_paths() -> list[Path]:
    paths = sorted((SAMPLES / "hushem").glob("*.BMP")) + sorted((SAMPLES / "smids").glob("*.png"))
    if len(paths) < 12:
        pytest.skip("samples/ missing")
    return paths


def many_frames(n: int) -> list[Frame]:
    paths = sample_paths()
    return [Frame(f"frame{i:04d}:{paths[i % len(paths)].name}", str(paths[i % len(paths)])) for i in range(n)]


def slow(frames, delay):
    for f in frames:
        time.sleep(delay)
        yield f


@pytest.fixture(scope="module")
def classifier_only_repo(serving_repository, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("classifier_repo")
    for model in serving_repository.iterdir():
        if model.is_dir() and not model.name.endswith(EXPLAIN_SUFFIX):
            shutil.copytree(model, out / model.name, symlinks=True)
    return out


def start_server(repo: Path, grpc_port: int = 0):
    from morphocam.serving.launcher import TritonServer

    srv = TritonServer(repo, grpc_port=grpc_port, http_port=0, metrics_port=0, startup_timeout=240)
    return srv.start()


# ---------------------------------------------------------------------------------- basic stream
def test_every_frame_once_in_order_with_bad_files(triton_server, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = sample_paths()[:13]
    for p in paths:
        shutil.copyfile(p, folder / p.name)
    (folder / "Normal__zero_bytes.BMP").write_bytes(b"")
    (folder / "Normal__truncated.BMP").write_bytes(paths[0].read_bytes()[:300])
    frames = list(expand_inputs([str(folder)]))
    out = list(classify_frames(frames, [triton_server.grpc_url], MODEL, batch_size=5, max_wait_ms=10,
                               max_in_flight=2, retry_deadline_s=60))
    assert [r["frame_id"] for r in out] == [f.id for f in frames]  # 15 frames, batch 5 does not divide 13 ok
    errors = {Path(r["frame_id"]).name: r for r in out if r["status"] == "error"}
    assert set(errors) == {"Normal__zero_bytes.BMP", "Normal__truncated.BMP"}
    assert "0 bytes" in errors["Normal__zero_bytes.BMP"]["error"]
    ok = [r for r in out if r["status"] == "ok"]
    assert len(ok) == 13
    for r in ok:
        assert list(r["probabilities"]) == list(HUSHEM)
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-3
        assert r["predicted_class"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["model"] == MODEL and r["model_version"] == "1" and r["latency_ms"] > 0


# ---------------------------------------------------------------------------------- restart
def test_server_stopped_and_restarted_mid_stream(classifier_only_repo):
    srv = start_server(classifier_only_repo)
    port = srv.grpc_port
    frames = many_frames(60)
    results: list[dict] = []
    restarted = threading.Event()
    finished = threading.Event()
    problems: list[str] = []

    def bounce():
        # tritonserver sets a parent-death signal (prctl): it gets SIGTERM when the *thread* that
        # spawned it exits, so this thread stays alive until the stream is over and stops it itself.
        try:
            while len(results) < 10:
                time.sleep(0.05)
            srv.stop()
            time.sleep(1.0)
            srv.start()
            restarted.set()
            finished.wait(300)
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            problems.append(f"restart failed: {exc}")
        finally:
            srv.stop()

    t = threading.Thread(target=bounce, daemon=True)
    t.start()
    try:
        try:
            for r in classify_frames(slow(frames, 0.03), [f"127.0.0.1:{port}"], MODEL, batch_size=4,
                                     max_wait_ms=20, max_in_flight=2, timeout_s=20, retry_deadline_s=120):
                results.append(r)
        except Exception as exc:
            raise AssertionError(f"{exc}; bounce: {problems}; restarted: {restarted.is_set()}; "
                                 f"server log:\n{srv.log_tail(30)}") from None
        finished.set()
        t.join(timeout=60)
        assert restarted.is_set(), problems
        assert [r["frame_id"] for r in results] == [f.id for f in frames]
        assert all(r["status"] == "ok" for r in results)
        assert max(r.get("attempts", 1) for r in results) > 1  # some batch really went through a retry
    finally:
        finished.set()
        t.join(timeout=60)
        srv.stop()


# ---------------------------------------------------------------------------------- two servers
def test_two_servers_one_killed_mid_stream(classifier_only_repo):
    a = start_server(classifier_only_repo)
    b = start_server(classifier_only_repo)
    frames = many_frames(60)
    results: list[dict] = []
    try:
        for r in classify_frames(slow(frames, 0.02), [a.grpc_url, b.grpc_url], MODEL, batch_size=4,
                                 max_wait_ms=20, max_in_flight=4, timeout_s=20, retry_deadline_s=120):
            results.append(r)
            if len(results) == 12:
                os.killpg(a.pid, signal.SIGKILL)  # the whole server, stubs included, dies at once
        ids = [r["frame_id"] for r in results]
        assert ids == [f.id for f in frames] and len(set(ids)) == 60
        assert all(r["status"] == "ok" for r in results)
        # Up to a client window (batch * (in flight + 2) + 2 * workers = 28 frames) past the kill may
        # already have been answered by A; everything after that came from B.
        after = {r["server"] for r in results[12 + 28:]}
        assert after == {b.grpc_url}
        assert {r["server"] for r in results[:12]} <= {a.grpc_url, b.grpc_url}
    finally:
        a.stop()
        b.stop()


# ---------------------------------------------------------------------------------- CLI resume
def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "morphocam.clients.classify_cli", "--no-progress", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_resume_after_killed_client_gives_the_same_results(triton_server, tmp_path):
    frames = tmp_path / "frames"  # 72 distinct frame ids (the samples twice, as links) so the kill lands mid-run
    for copy in range(2):
        for p in sample_paths():
            (frames / f"copy{copy}").mkdir(parents=True, exist_ok=True)
            (frames / f"copy{copy}" / p.name).symlink_to(p)
    common = ["--url", triton_server.grpc_url, "--model", MODEL, "--batch-size", "2", "--max-in-flight", "1",
              str(frames)]
    full = tmp_path / "full.jsonl"
    done = _cli([*common, "--output", str(full)])
    _, err = done.communicate(timeout=240)
    assert done.returncode == 0, err
    expected = _lines(full)
    assert len(expected) == 2 * len(sample_paths())

    part = tmp_path / "part.jsonl"
    proc = _cli([*common, "--output", str(part)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not part.exists() or part.read_text().count("\n") < 6):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    answered = part.read_text().count("\n")
    assert 0 < answered < len(expected), "the client was not killed mid-run"
    with open(part, "a") as fh:  # as if the kill had landed in the middle of a write
        fh.write('{"frame_id": "samples/hush')
    resumed = _cli([*common, "--output", str(part), "--resume"])
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    got = _lines(part)  # every line parses: the truncated one was cut off
    assert [r["frame_id"] for r in got] == [r["frame_id"] for r in expected]
    for g, e in zip(got, expected):
        assert g["predicted_class"] == e["predicted_class"]
        for c in HUSHEM:
            assert g["probabilities"][c] == pytest.approx(e["probabilities"][c], abs=1e-3)
    assert "skipped as already answered" in err and f"{answered} frames already answered" in err


def test_cli_csv_and_summary(triton_server, tmp_path):
    out = tmp_path / "r.csv"
    proc = _cli(["--url", triton_server.grpc_url, "--model", MODEL, "--output", str(out), "--batch-size", "8",
                 "--summary-json", str(tmp_path / "s.json"), str(SAMPLES / "hushem")])
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    rows = out.read_text().splitlines()
    assert rows[0].startswith("frame_id,status,predicted_class,class_index,confidence,p_Normal,p_Tapered")
    assert len(rows) == 13
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["frames"] == 12 and summary["errors"] == 0 and summary["latency_ms_p99"] > 0


def test_explain_least_confident(triton_server, contract, tmp_path):
    from morphocam.clients.explain_cli import main as explain_main
    from morphocam.clients.results_io import ResultWriter

    results = tmp_path / "r.jsonl"
    with ResultWriter(results) as w:
        for r in classify_frames(list(expand_inputs([str(SAMPLES / "hushem")])), [triton_server.grpc_url], MODEL):
            w.write(r)
    code = explain_main(["--url", triton_server.grpc_url, "--from-results", str(results), "--least-confident", "2",
                         "--output-dir", str(tmp_path / "ex")])
    assert code == 0
    heatmaps = sorted((tmp_path / "ex").glob("*_heatmap.npy"))
    overlays = sorted((tmp_path / "ex").glob("*_overlay.png"))
    assert len(heatmaps) == 2 and len(overlays) == 2
    h = np.load(heatmaps[0])
    assert h.shape == (contract.height, contract.width) and h.min() >= 0 and h.max() <= 1
    assert (tmp_path / "ex" / "contact_sheet.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_end_to_end(serving_repository, tmp_path):
    from morphocam.clients.demo import main as demo_main

    assert demo_main(["--model-repository", str(serving_repository), "--output-dir", str(tmp_path)]) == 0
    ds = "hushem"
    lines = (tmp_path / ds / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(list((SAMPLES / ds).glob("*.BMP")))
    report = json.loads((tmp_path / ds / "report" / "report.json").read_text())
    assert report["classified"] == len(lines)
    assert len(list((tmp_path / ds / "explain").glob("*_overlay.png"))) == 3
