"""The trust fields in client records and what the report does with them.

Unit part: hand-made records (counts by hand). Live part: a shifted HuSHem sample — the bundled
HuSHem frames with blank, noise and corrupted frames mixed in — streamed through the real server
by the CASA client, then reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from morphocam.clients.report import build_report, format_text, write_report
from morphocam.clients.results_io import ResultWriter, read_records
from morphocam.contract import DATASET_CLASSES

SMIDS = DATASET_CLASSES["smids"]
REPO = Path(__file__).resolve().parents[1]


def rec(i, cls, in_domain=True, pset=None, score=0.5):
    return {"frame_id": f"f{i:03d}", "status": "ok", "predicted_class": cls, "confidence": 0.8,
            "probabilities": {c: (0.8 if c == cls else 0.1) for c in SMIDS},
            "in_domain": in_domain, "ood_score": score if in_domain else 3.0, "prediction_set": pset or [cls]}


def test_out_of_domain_frames_are_excluded_and_listed():
    # 8 normal + 32 abnormal trusted, 5 out-of-domain (11%), 3 uncertain -> 8 of 40 trusted cells = 20%
    records = ([rec(i, "Normal_Sperm") for i in range(8)] + [rec(10 + i, "Abnormal_Sperm") for i in range(32)]
               + [rec(50 + i, "Normal_Sperm", in_domain=False) for i in range(5)]
               + [rec(60 + i, "Abnormal_Sperm", pset=["Abnormal_Sperm", "Normal_Sperm"]) for i in range(3)])
    r = build_report(records)
    assert r["classified"] == 48 and r["out_of_domain"] == 5 and r["uncertain"] == 3 and r["trusted"] == 40
    assert r["cells_assessed"] == 40 and r["normal_forms"] == 8 and r["normal_forms_pct"] == 20.0
    assert not r["assess_by_hand"]
    assert [f["frame_id"] for f in r["out_of_domain_frames"]] == [f"f{50 + i:03d}" for i in range(5)]
    assert [f["prediction_set"] for f in r["uncertain_frames"]] == [["Abnormal_Sperm", "Normal_Sperm"]] * 3
    # the 3 uncertain cells could each be normal: 8/43 .. 11/43
    assert r["normal_forms_pct_if_uncertain_resolved"] == [round(800 / 43, 2), round(1100 / 43, 2)]
    assert any("5 frame(s) look unlike the training images" in f for f in r["flags"])
    assert any("3 frame(s) are uncertain" in f for f in r["flags"])


def test_mostly_out_of_domain_sample_gets_no_percentage():
    records = [rec(i, "Normal_Sperm") for i in range(10)] + [rec(20 + i, "Abnormal_Sperm", in_domain=False)
                                                             for i in range(5)]
    r = build_report(records)  # 5 of 15 = 33% > 25%
    assert r["assess_by_hand"] and r["normal_forms_pct"] is None and r["normal_forms_ci95_pct"] is None
    assert r["who_reference"]["status"] == "not assessable"
    assert any("must be assessed by hand" in f for f in r["flags"])
    assert "NOT GIVEN" in format_text(r)
    # the same sample with a looser stated share is reported on its 10 in-domain cells
    loose = build_report(records, max_ood_share=0.5)
    assert loose["normal_forms_pct"] == 100.0 and not loose["assess_by_hand"]


def test_who_flag_uses_only_trusted_cells():
    # 3 trusted normal of 100 trusted cells = 3% (< 4%); 20 uncertain normal-or-not frames do not lift it
    records = ([rec(i, "Normal_Sperm") for i in range(3)] + [rec(10 + i, "Abnormal_Sperm") for i in range(97)]
               + [rec(200 + i, "Normal_Sperm", pset=["Normal_Sperm", "Abnormal_Sperm"]) for i in range(20)])
    r = build_report(records)
    assert r["normal_forms_pct"] == 3.0 and r["who_reference"]["status"] == "below the WHO lower reference limit"


def test_records_without_trust_fields_are_all_counted():
    records = [{"frame_id": str(i), "status": "ok", "predicted_class": c} for i, c in
               enumerate(["Normal_Sperm"] * 3 + ["Abnormal_Sperm"] * 7)]
    r = build_report(records)
    assert r["trusted"] == 10 and r["normal_forms_pct"] == 30.0
    assert any("no in-domain flag" in f for f in r["flags"])


def test_html_and_json_show_the_excluded_and_uncertain_frames(tmp_path):
    records = ([rec(i, "Normal_Sperm") for i in range(6)] + [rec(7, "Normal_Sperm", in_domain=False)]
               + [rec(8, "Abnormal_Sperm", pset=["Abnormal_Sperm", "Non-Sperm"])])
    paths = write_report(build_report(records, explanations={"f008": "explain/008_overlay.png"}), tmp_path)
    page = paths["html"].read_text()
    assert "Out-of-domain frames (1)" in page and "f007" in page
    assert "Uncertain frames (1)" in page and "Abnormal_Sperm, Non-Sperm" in page and "explain/008_overlay.png" in page
    saved = json.loads(paths["json"].read_text())
    assert saved["out_of_domain_frames"][0]["frame_id"] == "f007"
    assert saved["uncertain_frames"][0]["explanation"] == "explain/008_overlay.png"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_trust_fields_round_trip_through_results_files(tmp_path, fmt):
    records = [rec(1, "Normal_Sperm"), rec(2, "Non-Sperm", in_domain=False),
               rec(3, "Abnormal_Sperm", pset=["Abnormal_Sperm", "Normal_Sperm"])]
    path = tmp_path / f"r.{fmt}"
    with ResultWriter(path, fmt, SMIDS) as w:
        for r in records:
            w.write(r)
    back = read_records(path)
    assert [r["in_domain"] for r in back] == [True, False, True]
    assert [r["prediction_set"] for r in back] == [["Normal_Sperm"], ["Non-Sperm"], ["Abnormal_Sperm", "Normal_Sperm"]]
    assert back[1]["ood_score"] == pytest.approx(3.0)


# ------------------------------------------------------------------ live: a shifted sample through the server

def shifted_hushem_sample(folder: Path, size: int) -> tuple[list[Path], set[str]]:
    """The 12 bundled HuSHem frames + 2 blank, 1 noise and 3 heavily corrupted frames."""
    from PIL import Image

    from morphocam.benchmarks.corruptions import defocus_blur, motion_blur, underexposure

    clean = sorted((REPO / "samples" / "hushem").glob("*.BMP"))
    if len(clean) < 12:
        pytest.skip("samples/hushem missing")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shifted = {"blank_black.png": np.zeros((size, size, 3), np.uint8),
               "blank_white.png": np.full((size, size, 3), 255, np.uint8),
               "noise.png": rng.integers(0, 256, (size, size, 3)).astype(np.uint8)}
    for fn in (defocus_blur, motion_blur, underexposure):
        img = np.asarray(Image.open(clean[0]).convert("RGB").resize((size, size)))
        shifted[f"{fn.__name__}.png"] = fn(img, 3)
    for name, img in shifted.items():
        Image.fromarray(img).save(folder / name)
    return clean + sorted(folder.iterdir()), set(shifted)


def test_shifted_sample_through_the_server(triton_server, contract, tmp_path):
    from morphocam.clients.streaming import classify_frames

    paths, shifted = shifted_hushem_sample(tmp_path / "shifted", contract.height)
    records = list(classify_frames([str(p) for p in paths], urls=[triton_server.grpc_url], model="morphocam_hushem",
                                   batch_size=4))
    assert len(records) == 18 and all(r["status"] == "ok" for r in records)
    for r in records:
        assert isinstance(r["in_domain"], bool) and r["predicted_class"] in r["prediction_set"]
        assert set(r["prediction_set"]) <= set(contract.classes)
    flagged = {Path(r["frame_id"]).name for r in records if not r["in_domain"]}
    print("flagged out-of-domain:", sorted(flagged), [r["ood_score"] for r in records])
    assert {"blank_black.png", "blank_white.png", "noise.png"} <= flagged
    assert len(flagged & shifted) >= 5
    report = build_report(records)  # 6 of 18 shifted = 33% > 25%: no % normal
    assert report["assess_by_hand"] and report["normal_forms_pct"] is None
    assert report["out_of_domain"] == len(flagged)
    # the clean frames alone are reported (most in-domain) and give a percentage
    clean_only = build_report([r for r in records if Path(r["frame_id"]).name not in shifted])
    assert not clean_only["assess_by_hand"] and clean_only["normal_forms_pct"] is not None
