"""Pure tests of the CASA client: no server (a fake gRPC client stands in for tritonclient)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from morphocam.clients.report import WHO_MIN_CELLS, build_report, write_report
from morphocam.clients.results_io import ResultWriter, read_records
from morphocam.clients.sources import Frame, expand_inputs, npy_stream_frames, resume_key, video_frames
from morphocam.stats import wilson_interval
from morphocam.clients.streaming import ClientOptions, ModelInfo, StreamingClassifier, is_transient, parse_classification

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SMIDS = ("Normal_Sperm", "Abnormal_Sperm", "Non-Sperm")
HUSHEM = ("Normal", "Tapered", "Pyriform", "Amorphous")


# --------------------------------------------------------------------------- fake transport
class FakeError(Exception):
    def __init__(self, status: str, msg: str = "fake"):
        super().__init__(msg)
        self._status = status

    def status(self):
        return f"StatusCode.{self._status}"


class FakeResult:
    def __init__(self, probs):
        self._probs = probs

    def as_numpy(self, name):
        return self._probs

    def get_response(self):
        return type("R", (), {"model_version": "1"})()


class FakeClient:
    """Answers each batch from a thread after ``delay`` s; probabilities encode the frame's mean pixel."""

    def __init__(self, url, k=3, delay=0.005, fail_first=0, fail_status="UNAVAILABLE", dead=False):
        self.url, self.k, self.delay = url, k, delay
        self.fail_left = fail_first
        self.fail_status = fail_status
        self.dead = dead
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def async_infer(self, model_name, inputs, callback, model_version="", outputs=None, client_timeout=None):
        pixels = inputs[0]._np  # set by the patched InferInput below
        with self.lock:
            fail = self.dead or self.fail_left > 0
            if self.fail_left > 0:
                self.fail_left -= 1
            if not fail:
                self.batches.append(len(pixels))

        def reply():
            time.sleep(self.delay)
            if fail:
                callback(result=None, error=FakeError(self.fail_status))
                return
            idx = pixels.reshape(len(pixels), -1)[:, 0].astype(np.int64) % self.k
            probs = np.full((len(pixels), self.k), 0.1 / (self.k - 1), np.float32)
            probs[np.arange(len(pixels)), idx] = 0.9
            callback(result=FakeResult(probs), error=None)

        threading.Thread(target=reply, daemon=True).start()

    def close(self):
        pass


@pytest.fixture(autouse=True)
def _keep_numpy_on_infer_input(monkeypatch):
    import tritonclient.grpc as grpcclient

    original = grpcclient.InferInput.set_data_from_numpy

    def keep(self, arr):
        self._np = arr
        return original(self, arr)

    monkeypatch.setattr(grpcclient.InferInput, "set_data_from_numpy", keep)


def info(k=3, size=8):
    return ModelInfo(name="fake", height=size, width=size, classes=(SMIDS if k == 3 else HUSHEM), max_batch_size=32,
                     version="1")


def frames_of(values, size=8):
    """Frames whose pixels are all ``v``: the fake server predicts class v % k."""
    return [Frame(f"f{i:03d}", np.full((size, size, 3), v, np.uint8)) for i, v in enumerate(values)]


def run(frames, clients, **kw):
    urls = list(clients)
    opts = ClientOptions(urls=urls, model="fake", retry_deadline_s=kw.pop("retry_deadline_s", 10.0),
                         backoff_initial_s=0.01, backoff_max_s=0.05, **kw)
    sc = StreamingClassifier(opts, client_factory=lambda u: clients[u], model_info=info())
    return sc, list(sc.run(frames))


# --------------------------------------------------------------------------- batching, order
def test_every_frame_once_in_order_when_batch_does_not_divide():
    fake = FakeClient("a", delay=0.002)
    frames = frames_of(range(23))
    sc, out = run(frames, {"a": fake}, batch_size=5, max_wait_ms=50, max_in_flight=3)
    assert [r["frame_id"] for r in out] == [f.id for f in frames]
    assert [r["class_index"] for r in out] == [i % 3 for i in range(23)]
    assert sum(fake.batches) == 23 and max(fake.batches) <= 5
    assert all(r["status"] == "ok" and r["model_version"] == "1" for r in out)
    assert sc.stats.summary()["frames"] == 23


def test_batches_fill_to_size_when_frames_arrive_fast():
    fake = FakeClient("a")
    sc, out = run(frames_of(range(32)), {"a": fake}, batch_size=8, max_wait_ms=2000, max_in_flight=2)
    assert fake.batches == [8, 8, 8, 8]


def test_slow_trickle_is_not_held_back_by_batch_size():
    fake = FakeClient("a")

    def trickle():
        for f in frames_of(range(4)):
            time.sleep(0.15)
            yield f

    t0 = time.monotonic()
    sc, out = run(trickle(), {"a": fake}, batch_size=32, max_wait_ms=20, max_in_flight=2)
    assert len(out) == 4
    # Each frame went out on its own after ~20 ms instead of waiting for 32 frames.
    assert fake.batches == [1, 1, 1, 1]
    sent = [t for t, _ in sc.batch_log]
    assert time.monotonic() - t0 < 1.5
    assert all(b - a > 0.1 for a, b in zip(sent, sent[1:]))


def test_transient_failures_are_retried_without_duplicates():
    fake = FakeClient("a", fail_first=3, fail_status="UNAVAILABLE")
    sc, out = run(frames_of(range(17)), {"a": fake}, batch_size=4, max_in_flight=2)
    assert [r["frame_id"] for r in out] == [f"f{i:03d}" for i in range(17)]
    assert sum(fake.batches) == 17
    assert sc.stats.retries == 3


def test_failover_to_the_healthy_server():
    dead = FakeClient("a", dead=True)
    good = FakeClient("b")
    sc, out = run(frames_of(range(20)), {"a": dead, "b": good}, batch_size=4, max_in_flight=2)
    assert len(out) == 20 and len({r["frame_id"] for r in out}) == 20
    assert {r["server"] for r in out} == {"b"}
    assert sum(good.batches) == 20


def test_permanent_error_gives_error_records_and_stream_goes_on():
    fake = FakeClient("a", fail_first=1, fail_status="INVALID_ARGUMENT")
    sc, out = run(frames_of(range(6)), {"a": fake}, batch_size=3, max_in_flight=1)
    assert [r["status"] for r in out] == ["error"] * 3 + ["ok"] * 3
    assert "INVALID_ARGUMENT" in out[0]["error"]


def test_all_servers_down_raises_after_deadline():
    from morphocam.clients.streaming import ServerUnavailable

    dead = FakeClient("a", dead=True)
    with pytest.raises(ServerUnavailable):
        run(frames_of(range(3)), {"a": dead}, batch_size=3, retry_deadline_s=0.3)


def test_transient_classification():
    assert is_transient(FakeError("UNAVAILABLE"))
    assert is_transient(FakeError("DEADLINE_EXCEEDED"))
    assert not is_transient(FakeError("INVALID_ARGUMENT", "shape mismatch"))
    assert is_transient(ConnectionRefusedError())


def test_parse_classification_labels():
    raw = np.array([b"0.7:2:Pyriform", b"0.2:0:Normal", b"0.05:1:Tapered", b"0.05:3:Amorphous"])
    assert parse_classification(raw, 4) == HUSHEM
    assert parse_classification(raw[:3], 4) is None


# --------------------------------------------------------------------------- frame sources, decode errors
def test_corrupt_and_zero_byte_files_give_error_records(tmp_path):
    good = sorted((SAMPLES / "smids").glob("*.png"))[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "b_zero.png").write_bytes(b"")
    (folder / "c_corrupt.png").write_bytes(good[0].read_bytes()[:200])
    (folder / "d_text.bmp").write_bytes(b"not an image at all")
    fake = FakeClient("a")
    frames = list(expand_inputs([str(folder)]))
    sc, out = run(frames, {"a": fake}, batch_size=4)
    by_id = {Path(r["frame_id"]).name: r for r in out}
    assert len(out) == 6
    assert by_id["b_zero.png"]["status"] == "error" and "0 bytes" in by_id["b_zero.png"]["error"]
    assert by_id["c_corrupt.png"]["status"] == "error"
    assert by_id["d_text.bmp"]["status"] == "error" and "not a recognised" in by_id["d_text.bmp"]["error"]
    assert sum(r["status"] == "ok" for r in out) == 3
    assert [r["frame_id"] for r in out] == [f.id for f in frames]


def test_frame_ids_are_stable_and_sorted(tmp_path):
    ids1 = [f.id for f in expand_inputs([str(SAMPLES)])]
    ids2 = [f.id for f in expand_inputs([str(SAMPLES)])]
    assert ids1 == ids2 and ids1 == sorted(ids1) and len(ids1) == 36 + 6  # + samples/smids_shifted
    globbed = [f.id for f in expand_inputs([str(SAMPLES / "hushem" / "*.BMP")])]
    assert globbed == [i for i in ids1 if "/hushem/" in i]
    missing = list(expand_inputs([str(tmp_path / "nope.png")]))
    assert missing[0].error and "no such file" in missing[0].error


def test_npy_stream_ids_and_resume_key():
    buf = io.BytesIO()
    np.save(buf, np.zeros((10, 12, 3), np.uint8))
    np.save(buf, np.ones((2, 10, 12, 3), np.uint8))  # a batch of two frames
    buf.seek(0)
    frames = list(npy_stream_frames(buf, clock=lambda: 1234.5))
    assert [f.id for f in frames] == ["stdin#0@1234.500000", "stdin#1@1234.500000", "stdin#2@1234.500000"]
    assert frames[2].payload.shape == (10, 12, 3)
    assert resume_key(frames[1].id) == "stdin#1"
    assert resume_key("samples/x.png") == "samples/x.png"


def test_video_frame_ids(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 24))
    for i in range(4):
        writer.write(np.full((24, 32, 3), i * 40, np.uint8))
    writer.release()
    frames = list(video_frames(path))
    assert [f.id for f in frames] == [f"{path}#frame={i}" for i in range(4)]
    assert frames[0].payload.shape == (24, 32, 3)


# --------------------------------------------------------------------------- output and resume
def test_resume_ignores_truncated_last_line(tmp_path):
    out = tmp_path / "r.jsonl"
    with ResultWriter(out) as w:
        for i in range(3):
            w.write({"frame_id": f"f{i}", "status": "ok", "predicted_class": "Normal_Sperm"})
    with open(out, "a") as fh:
        fh.write('{"frame_id": "f3", "status": "o')  # the crash happened mid-line
    assert [r["frame_id"] for r in read_records(out)] == ["f0", "f1", "f2"]
    w = ResultWriter(out, resume=True)
    assert w.done_keys == {"f0", "f1", "f2"}
    w.write({"frame_id": "f3", "status": "ok", "predicted_class": "Normal_Sperm"})
    w.close()
    lines = out.read_text().splitlines()
    assert [json.loads(line)["frame_id"] for line in lines] == ["f0", "f1", "f2", "f3"]


def test_csv_output_and_resume(tmp_path):
    out = tmp_path / "r.csv"
    rec = {"frame_id": "a,b.png", "status": "ok", "predicted_class": "Normal", "class_index": 0, "confidence": 0.9,
           "probabilities": dict(zip(HUSHEM, (0.9, 0.05, 0.03, 0.02))), "model": "m", "model_version": "1",
           "latency_ms": 3.5}
    with ResultWriter(out, "csv", HUSHEM) as w:
        w.write(rec)
        w.write({"frame_id": "bad.png", "status": "error", "error": "empty file", "model": "m"})
    with open(out, "a") as fh:
        fh.write("half,ok,Nor")
    recs = read_records(out)
    assert [r["frame_id"] for r in recs] == ["a,b.png", "bad.png"]
    assert recs[0]["probabilities"]["Normal"] == pytest.approx(0.9)
    w = ResultWriter(out, "csv", HUSHEM, resume=True)
    assert w.done_keys == {"a,b.png", "bad.png"}
    w.close()
    assert out.read_text().count("\n") == 3 and out.read_text().endswith("\n")


def test_resume_skips_answered_frames():
    fake = FakeClient("a")
    frames = frames_of(range(10))
    opts = ClientOptions(urls=["a"], model="fake", batch_size=3)
    sc = StreamingClassifier(opts, client_factory=lambda u: fake, model_info=info())
    out = list(sc.run(frames, skip_keys={"f000", "f004", "f009"}))
    assert [r["frame_id"] for r in out] == [f.id for f in frames if f.id not in {"f000", "f004", "f009"}]
    assert sc.stats.skipped == 3


# --------------------------------------------------------------------------- report maths
def rec(cls, status="ok"):
    if status != "ok":
        return {"frame_id": "x", "status": "error", "error": "corrupt"}
    return {"frame_id": "x", "status": "ok", "predicted_class": cls, "model": "m", "model_version": "1",
            "probabilities": {c: (1.0 if c == cls else 0.0) for c in SMIDS}}


def test_report_counts_exclude_non_sperm_and_errors():
    # Hand count: 6 normal, 14 abnormal, 5 non-sperm, 2 errors -> 20 cells, 30% normal.
    records = [rec("Normal_Sperm")] * 6 + [rec("Abnormal_Sperm")] * 14 + [rec("Non-Sperm")] * 5 + [rec("", "error")] * 2
    r = build_report(records)
    assert r["frames"] == 27 and r["classified"] == 25 and r["errors"] == 2
    assert r["cells_assessed"] == 20 and r["non_cells"] == 5 and r["normal_forms"] == 6
    assert r["normal_forms_pct"] == 30.0
    by = {c["class"]: c for c in r["classes"]}
    assert by["Abnormal_Sperm"]["pct_of_cells"] == 70.0 and by["Non-Sperm"]["pct_of_cells"] is None
    assert by["Non-Sperm"]["pct_of_classified"] == 20.0
    lo, hi = wilson_interval(6, 20)
    assert r["normal_forms_ci95_pct"] == [round(100 * lo, 2), round(100 * hi, 2)]
    assert r["who_reference"]["status"] == "at or above the WHO lower reference limit"
    assert any("only 20 cells assessed" in f for f in r["flags"])
    assert any("2 frame(s) could not be classified" in f for f in r["flags"])


def test_report_who_flag_below_four_percent():
    # 7 normal of 250 cells = 2.8% < 4%; 250 >= 200 so no small-sample warning.
    records = [{"frame_id": str(i), "status": "ok", "predicted_class": c} for i, c in
               enumerate(["Normal"] * 7 + ["Tapered"] * 100 + ["Pyriform"] * 93 + ["Amorphous"] * 50)]
    r = build_report(records, classes=HUSHEM)
    assert r["cells_assessed"] == 250 and r["normal_forms_pct"] == 2.8
    assert r["who_reference"]["status"] == "below the WHO lower reference limit"
    assert not any("cells assessed;" in f for f in r["flags"])
    assert any("spans" in f for f in r["flags"])  # CI 1.4-5.7% crosses 4%


@pytest.mark.parametrize("cells,flagged", [(WHO_MIN_CELLS - 1, True), (WHO_MIN_CELLS, False)])
def test_report_small_sample_flag_at_the_who_minimum(cells, flagged):
    records = [{"frame_id": str(i), "status": "ok", "predicted_class": "Normal" if i % 10 == 0 else "Tapered"}
               for i in range(cells)]
    r = build_report(records, classes=HUSHEM)
    assert any(f"only {cells} cells assessed" in f for f in r["flags"]) is flagged, r["flags"]


def test_report_html_and_json(tmp_path):
    records = [rec("Normal_Sperm")] * 3 + [rec("Abnormal_Sperm")] * 2
    r = build_report(records, sample="S1")
    paths = write_report(r, tmp_path)
    page = paths["html"].read_text()
    assert "Decision aid only, not a diagnosis" in page and "data:image/png;base64," in page
    assert json.loads(paths["json"].read_text())["normal_forms_pct"] == 60.0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_on_truncated_file(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text("\n".join(json.dumps(rec(c)) for c in ["Normal_Sperm", "Abnormal_Sperm"]) + "\n" + '{"frame_')
    from morphocam.clients.report_cli import main

    assert main([str(out), "--output-dir", str(tmp_path / "rep")]) == 0
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["classified"] == 2


def test_clients_do_not_import_torch_or_server_code():
    code = ("import sys, morphocam.clients.classify_cli, morphocam.clients.explain_cli, morphocam.clients.report_cli, morphocam.clients.streaming; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export', 'serving')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_demo_fails_clearly_without_a_model_repository(tmp_path, capsys):
    from morphocam.clients.demo import main as demo_main

    assert demo_main(["--model-repository", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert demo_main(["--model-repository", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds no morphocam_<dataset> model" in err and "morphocam-export" in err
