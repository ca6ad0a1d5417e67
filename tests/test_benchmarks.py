"""One quick smoke test per benchmark so they do not rot: speeds are not asserted; what each run
records (settings, counts, accuracies from its own predictions) is."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from morphocam.benchmarks.accuracy import run as run_accuracy
from morphocam.benchmarks.accuracy import smoke_config, summarise_folds
from morphocam.engines import EngineSettings
from morphocam.export.config import ExportConfig
from morphocam.benchmarks.calibration import expected_calibration_error, fit_temperature, softmax_t
from morphocam.benchmarks.cli import main as bench_main
from morphocam.benchmarks.paper import PAPER_TABLE


def test_ece_hand_computed():
    # two frames at confidence 0.9 (one right, one wrong) and two at 0.6 (both right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bin 0.9: |0.5 - 0.9| * 2/4 = 0.2 ; bin 0.6: |1.0 - 0.6| * 2/4 = 0.2
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_temperature_scaling_softens_overconfident_predictions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), labels] += 1.0
    logits *= 6  # far too confident for ~60% accuracy
    logp = np.log(softmax_t(logits, 1.0))
    t = fit_temperature(logp, labels)
    assert t > 2
    assert expected_calibration_error(softmax_t(logp, t), labels) < expected_calibration_error(softmax_t(logp, 1), labels)


def test_fold_summary_statistics():
    rows = [{"accuracy": a, "macro_f1": a - 0.1} for a in (0.8, 0.9, 1.0)]
    s = summarise_folds(rows)
    assert s["accuracy_mean"] == pytest.approx(0.9) and s["accuracy_std"] == pytest.approx(0.1)
    # t(0.975, 2) = 4.303 -> half-width 4.303 * 0.1 / sqrt(3)
    assert s["accuracy_ci95"][1] - 0.9 == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)


def _fold(val, val_tta, test, test_tta, n_val=20):
    return {"accuracy": test, "macro_f1": test, "accuracy_tta": test_tta, "n_val": n_val,
            "val_accuracy": val, "val_accuracy_tta": val_tta}


@pytest.mark.parametrize("val_tta_gain", [-0.05, 0.0, 0.05])
def test_cv_decides_tta_on_validation_not_on_test(val_tta_gain):
    # TTA scores better on every test fold; only the pooled validation images may turn it on
    rows = [_fold(0.8, 0.8 + val_tta_gain, 0.8, 0.9), _fold(0.9, 0.9 + val_tta_gain, 0.7, 0.8, n_val=30)]
    tta = summarise_folds(rows)["tta"]
    assert tta["n_val"] == 50 and tta["val_accuracy"] == pytest.approx((20 * 0.8 + 30 * 0.9) / 50)
    assert tta["chosen_on_val"] is (val_tta_gain > 0)
    assert tta["accuracy_tta_mean"] == pytest.approx(0.85)
    assert tta["accuracy_mean_as_chosen"] == pytest.approx(0.85 if val_tta_gain > 0 else 0.75)


@pytest.mark.slow
def test_accuracy_benchmark_smoke_and_resume(tmp_path, hushem_dir):
    cfg = smoke_config(tmp_path, hushem_dir.parent)
    summary = run_accuracy(cfg)
    row = summary["single_split"]["hushem"]["simplecnn"]
    # the row reports the run's own test predictions, beside the paper's figure for the same row
    pred = np.load(tmp_path / "hushem" / "simplecnn" / "single" / "test_predictions.npz")
    assert row["n_test"] == len(pred["labels"])
    assert row["accuracy"] == pytest.approx(float(np.mean(pred["probs"].argmax(1) == pred["labels"])))
    assert row["paper_accuracy"] == PAPER_TABLE["simplecnn"]["hushem"][0]
    assert (tmp_path / "accuracy.json").is_file() and (tmp_path / "accuracy.png").is_file()
    # resumable: the finished run is reused, not retrained
    mtime = (tmp_path / "hushem" / "simplecnn" / "single" / "metrics.json").stat().st_mtime
    run_accuracy(cfg)
    assert (tmp_path / "hushem" / "simplecnn" / "single" / "metrics.json").stat().st_mtime == mtime
    assert json.loads((tmp_path / "accuracy.json").read_text())["single_split"]["hushem"]["simplecnn"] == row
    # an invocation that runs other rows (here: none) keeps what earlier invocations landed in the folder
    from dataclasses import replace

    before = (tmp_path / "accuracy.json").read_text()
    run_accuracy(replace(cfg, configs=(), datasets=("smids",)))
    assert json.loads((tmp_path / "accuracy.json").read_text())["single_split"]["hushem"]["simplecnn"] == row
    # and, as it landed nothing, it leaves the file alone: "config" stays the invocation that landed the rows
    assert (tmp_path / "accuracy.json").read_text() == before


@pytest.mark.slow
def test_ensemble_members_trained_averaged_and_served_as_one_graph(tmp_path, hushem_dir):
    from dataclasses import replace

    from morphocam.benchmarks.ensemble import EnsembleBenchConfig, run as run_ensemble

    cfg = replace(smoke_config(tmp_path, hushem_dir.parent), configs=(), members=2, arch="simplecnn",
                  pretrained="none")
    ens = run_accuracy(cfg)["ensemble"]["hushem"]
    preds = [np.load(tmp_path / "hushem" / "full" / f"member{m}" / "test_predictions.npz") for m in range(2)]
    single = np.load(tmp_path / "hushem" / "full" / "member0" / "test_predictions.npz")
    # both members were scored on the same images, and the ensemble is their averaged probabilities
    assert np.array_equal(preds[0]["paths"], preds[1]["paths"])
    mean = (preds[0]["probs"] + preds[1]["probs"]) / 2
    assert ens["accuracy"] == pytest.approx(float(np.mean(mean.argmax(1) == single["labels"])))
    assert ens["member_accuracy"] == [pytest.approx(float(np.mean(p["probs"].argmax(1) == p["labels"]))) for p in preds]
    splits = [json.loads((tmp_path / "hushem" / "full" / f"member{m}" / "split.json").read_text()) for m in range(2)]
    assert splits[0]["test"] == splits[1]["test"] and not set(splits[0]["val"]) & set(splits[1]["val"])
    assert [s["member"] for s in splits] == [0, 1]
    # a resumed invocation that reuses every member (here with other flags) leaves the file alone: midway
    # its ensemble holds one member, which must not overwrite the file's complete entry and "config"
    before = (tmp_path / "accuracy.json").read_text()
    run_accuracy(replace(cfg, train=False))
    assert (tmp_path / "accuracy.json").read_text() == before
    # the same members in one ONNX graph: its probabilities are the members' averaged, its accuracy
    # the accuracy benchmark's ensemble row, and it reports what it costs against one member
    bench = run_ensemble(EnsembleBenchConfig(
        checkpoints=[tmp_path / "hushem" / "full" / f"member{m}" / "model.safetensors" for m in range(2)],
        output_dir=tmp_path / "ens", seconds=0.2, batch=2))
    assert bench["parity_max_abs_prob_diff"] < 1e-5
    test = bench["accuracy"]["test"]
    assert test["n"] == len(single["labels"])
    assert test["ensemble"]["accuracy"] == pytest.approx(ens["accuracy"])
    assert [m["accuracy"] for m in test["members"]] == pytest.approx(ens["member_accuracy"])
    # the single split's validation part, which no member trained or stopped on, is scored too
    # (smoke data: 8 images per class; members split the rest of it and never see that part)
    seen = sum(len(splits[0][part]) for part in ("train", "val", "test"))
    assert bench["accuracy"]["val"]["n"] == 4 * 8 - seen > 0
    assert bench["images_per_s"]["single"] > 0 and bench["images_per_s"]["ensemble"] > 0
    assert bench["bytes"]["ensemble"] > 1.8 * bench["bytes"]["single"]  # both members' weights are in it
    assert (tmp_path / "ens" / "ensemble_hushem.json").is_file() and (tmp_path / "ens" / "ensemble_hushem.png").is_file()


def test_a_cell_held_by_another_process_is_skipped_not_trained_twice(tmp_path, hushem_dir):
    from dataclasses import replace

    from morphocam.benchmarks.accuracy import cell_lock, run_config, run_dir

    cfg = replace(smoke_config(tmp_path, hushem_dir.parent), busy="skip")
    out = run_dir(cfg, "hushem", "simplecnn", None)
    with cell_lock(out, wait=True) as held:  # as if a worker were training it
        assert held
        assert run_config(cfg, "hushem", "simplecnn", None) is None
        assert not (out / "metrics.json").exists() and not (out / "config.yaml").exists()


def test_benchmarks_beside_each_other_keep_their_own_worker_settings(tmp_path, hushem_dir):
    """Two benchmarks with other flags started side by side on one output folder (the GPU script's groups):
    each one's workers run its own settings and write their own logs (a shared settings file once made
    one group's workers train the other's cells)."""
    import threading
    from dataclasses import replace

    import yaml

    base = replace(smoke_config(tmp_path, hushem_dir.parent), workers=2, threads=1, train=False)
    a, b = replace(base, configs=("simplecnn",)), replace(base, configs=("full",), folds=2)
    threads = [threading.Thread(target=run_accuracy, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    settings = sorted((tmp_path / "logs").glob("workers-*.yaml"))
    assert len(settings) == 2
    assert sorted(tuple(yaml.safe_load(p.read_text())["configs"]) for p in settings) == [("full",), ("simplecnn",)]
    assert len(list((tmp_path / "logs").glob("worker-*.log"))) == 4


@pytest.mark.slow
def test_workers_share_the_cells_and_train_each_once(tmp_path, hushem_dir):
    from dataclasses import replace

    cfg = replace(smoke_config(tmp_path, hushem_dir.parent), folds=2, cv_datasets=("hushem",), arch="simplecnn",
                  pretrained="none", workers=2, threads=1, limit_per_class=16)
    summary = run_accuracy(cfg)
    cells = [tmp_path / "hushem" / "simplecnn" / "single", tmp_path / "hushem" / "full" / "fold0",
             tmp_path / "hushem" / "full" / "fold1"]
    assert all((c / "metrics.json").is_file() for c in cells)
    logs = [p.read_text() for p in sorted((tmp_path / "logs").glob("worker-*.log"))]
    assert len(logs) == 2
    # every cell was trained by exactly one worker (a training prints its data line once), none twice
    trained = [line for log in logs for line in log.splitlines() if line.startswith("[data]")]
    assert len(trained) == len(cells), logs
    # the summary pass after the workers holds every cell
    assert summary["cross_validation"]["hushem"]["folds"] == 2
    assert set(summary["single_split"]["hushem"]) == {"simplecnn"}
    # a summary-only pass (what a time-boxed GPU run ends with) trains nothing and lists what landed
    import shutil

    shutil.rmtree(cells[2])
    partial = run_accuracy(replace(cfg, workers=1, train=False))
    assert partial["cross_validation"]["hushem"]["folds"] == 1 and not cells[2].exists()


@pytest.mark.slow
def test_cv_of_an_ensemble_of_two_recipes_averages_their_fold_models(tmp_path, hushem_dir):
    from dataclasses import replace

    base = replace(smoke_config(tmp_path / "a", hushem_dir.parent), configs=(), folds=2, cv_datasets=("hushem",),
                   arch="simplecnn", pretrained="none", limit_per_class=16, threads=1)
    run_accuracy(base)
    # the other folder cross-validates another ablation row (--cv-config): its fold models are found by it
    other = replace(base, output_dir=tmp_path / "b", epochs=2, cv_config="efficientnet")
    assert run_accuracy(other)["cross_validation"]["hushem"]["config"] == "efficientnet"
    assert (tmp_path / "b" / "hushem" / "efficientnet" / "fold1" / "metrics.json").is_file()
    ens = run_accuracy(replace(base, cv_ensemble_with=(tmp_path / "b",)))["cv_ensemble"]["hushem"]
    assert ens["folds"] == 2 and ens["folds_missing"] == []
    for f, row in enumerate(ens["per_fold"]):
        a, b = (np.load(tmp_path / d / "hushem" / row / f"fold{f}" / "test_predictions.npz")
                for d, row in (("a", "full"), ("b", "efficientnet")))
        assert row["accuracy"] == pytest.approx(float(np.mean(((a["probs"] + b["probs"]) / 2).argmax(1) == a["labels"])))
    # a fold missing in one member is left out and named
    (tmp_path / "b" / "hushem" / "efficientnet" / "fold1" / "test_predictions.npz").unlink()
    ens = run_accuracy(replace(base, cv_ensemble_with=(tmp_path / "b",)))["cv_ensemble"]["hushem"]
    assert ens["folds"] == 1 and ens["folds_missing"] == [1]


@pytest.mark.slow
def test_linear_probe_uses_the_cv_folds_and_picks_c_on_validation(tmp_path, hushem_dir, repo_root):
    from morphocam.benchmarks.probe import ProbeConfig, run as run_probe
    from morphocam.training.config import TrainConfig
    from morphocam.training.trainer import load_dataset, make_split

    # ImageNet weights beside a trained morphocam model's backbone (the released SMIDS one)
    smids = str(repo_root / "results" / "training" / "smids" / "model.safetensors")
    cfg = ProbeConfig(data_root=hushem_dir.parent, weights=("lite0", smids), input_size=64, folds=3,
                      c_grid=(1e-4, 0.1), output_dir=tmp_path)
    probes = run_probe(cfg)["probes"]
    assert probes[smids]["label"] == "smids model" and "morphocam smids checkpoint" in probes[smids]["weights"]
    assert probes[smids]["n_test_per_fold"] == probes["lite0"]["n_test_per_fold"]
    r = probes["lite0"]
    val = r["val_accuracy_by_c"]
    assert r["c"] == max(cfg.c_grid, key=lambda c: val[str(c)])
    # the test folds are the accuracy benchmark's: every image scored once
    tcfg = TrainConfig(data_dir=hushem_dir, dataset="hushem", input_size=64, folds=3, fold=0, progress=False)
    folder = load_dataset(tcfg)
    sizes = []
    for f in range(3):
        tcfg.fold = f
        sizes.append(len(make_split(tcfg, folder).test))
    assert r["n_test_per_fold"] == sizes and sum(sizes) == len(folder.labels)
    assert r["test_accuracy_mean"] > 0.4  # frozen ImageNet features separate the four classes above chance (0.25)
    assert (tmp_path / "probe_hushem.json").is_file() and (tmp_path / "probe_hushem.png").is_file()


def test_bench_cli_rejects_unknown_commands(capsys):
    assert bench_main(["nonsense"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.slow
def test_serving_benchmark_smoke(serving_repository, repo_root, tmp_path):
    from morphocam.benchmarks.serving import ServingBenchConfig, run

    cfg = ServingBenchConfig(model_repository=serving_repository, images=repo_root / "samples" / "hushem",
                             output_dir=tmp_path, batches=(1,), concurrency=(2,), request_batches=(1, 4),
                             seconds=0.5, inprocess_seconds=0.2, explain=False, shared_memory=True,
                             stream_frames=40, instances=1, queue_delay_us=500,
                             classifier_engines=("native", "python-ort"))
    result = run(cfg)
    # both engines served in the one run, each on its own server, against the same ceiling
    assert list(result["engines"]) == ["native", "python-ort"]
    assert result["engines"]["native"]["served_config"]["engine"] == "onnxruntime (Triton backend)"
    assert result["engines"]["python-ort"]["served_config"]["engine"] == "onnxruntime"
    for engine in result["engines"].values():
        assert engine["served"] and all(r["errors"] == 0 for r in engine["served"])
        assert engine["streaming_client"]["records"] == 40
    # the ceiling cannot beat the machine's matmul peak, and it was measured with the served engine settings
    assert result["ceiling_images_per_s"] > 0 and 0 < result["ceiling_fraction_of_peak"] < 1
    served_settings = EngineSettings().describe()
    assert result["inprocess_settings"] == {k: served_settings[k] for k in ("threads", "spinning", "execution_mode")}
    assert result["inprocess_settings"]["threads"] == len(os.sched_getaffinity(0))
    assert json.loads((tmp_path / "serving.json").read_text()) == json.loads(json.dumps(result))
    # the override was served, not the repository's own config
    served_cfg = result["served_config"]
    assert served_cfg["instances"] == 1 and served_cfg["queue_delay_us"] == 500
    assert served_cfg["variant_of_released"]
    transports = {(r["transport"], r["frames_per_request"]) for r in result["served"]}
    assert {("grpc", 1), ("grpc", 4), ("shm", 1)} <= transports
    for row in result["served"]:
        assert row["errors"] == 0 and row["requests"] > 0 and row["avg_server_batch"] >= 1
        assert 0 < row["server_cpu_share"] and 0 < row["client_cpu_share"]
        assert row["ratio_to_ceiling_cpu_left"] >= row["ratio_to_ceiling"]
        # where the server time goes: queue and compute are parts of the request's time in the server
        assert 0 < row["server_compute_infer_ms"] <= row["server_success_ms"]
        assert 0 <= row["server_queue_ms"] <= row["server_success_ms"]
    stream = result["streaming_client"]
    assert stream["records"] == stream["frames"] == 40 and stream["errors"] == 0
    assert (tmp_path / "serving.json").is_file() and (tmp_path / "serving.png").is_file()


@pytest.mark.slow
def test_serving_sweep_smoke(serving_repository, repo_root, tmp_path):
    from morphocam.benchmarks.serving_sweep import SweepConfig, run

    cfg = SweepConfig(model_repository=serving_repository, model="morphocam_hushem",
                      images=repo_root / "samples" / "hushem", output_dir=tmp_path, engines=("native:fp32",),
                      layouts=("2x1",), delays_us=(1000,), concurrency=(2,), seconds=0.5, inprocess_seconds=0.2)
    result = run(cfg)
    (point,) = result["points"]
    assert (point["instances"], point["threads"], point["queue_delay_us"]) == (2, 1, 1000)
    assert point["engine"] == "native"
    assert point["errors"] == 0 and point["requests"] > 0 and point["avg_server_batch"] >= 1
    assert point["label"] == "native, 2x1, delay 1000 us"
    served_settings = EngineSettings().describe()
    assert result["inprocess_settings"] == {k: served_settings[k] for k in ("threads", "spinning", "execution_mode")}
    assert (tmp_path / "sweep.json").is_file() and (tmp_path / "sweep.png").is_file()


@pytest.mark.slow
def test_explanations_and_calibration_benchmarks_smoke(hushem_dir, repo_root, tmp_path):
    from morphocam.benchmarks import calibration, explanations

    ckpt = repo_root / "results" / "training" / "hushem" / "model.safetensors"
    rows = explanations.run([ckpt], hushem_dir, tmp_path, limit=4)
    (row,) = rows.values()
    assert row["n"] == 4 and row["ms_per_image_batch1"] > 0
    assert (tmp_path / "explanations.png").is_file()
    cal = calibration.run(ckpt, hushem_dir, tmp_path)
    assert cal["n_test"] == len(np.load(ckpt.with_name("test_predictions.npz"))["labels"]) and cal["temperature"] > 0
    assert (tmp_path / "calibration_hushem.png").is_file()


def test_serving_variant_overrides_only_the_copy(serving_repository, tmp_path):
    from morphocam.export import pbtxt
    from morphocam.benchmarks.variants import ServingVariant, describe, write_variant

    released = (serving_repository / "morphocam_hushem" / "config.pbtxt").read_text()
    variant = ServingVariant(engine="openvino", precision="fp32", instances=3, threads=1, queue_delay_us=750,
                             preferred_batch_sizes=(4, 8))
    repo = write_variant(serving_repository, "morphocam_hushem", variant, tmp_path / "repo")
    got = describe(repo / "morphocam_hushem" / "config.pbtxt")
    assert (got["engine"], got["precision"], got["instances"], got["threads"], got["queue_delay_us"],
            got["preferred_batch_sizes"]) == ("openvino", "fp32", 3, 1, 750, [4, 8])
    # everything else is the released model: same graph, same digest sidecar, same I/O
    for name in ("model.onnx", "model.onnx.sha256", "contract.json"):
        assert (repo / "morphocam_hushem" / "1" / name).read_bytes() == \
            (serving_repository / "morphocam_hushem" / "1" / name).read_bytes()
    assert pbtxt.parse(repo / "morphocam_hushem" / "config.pbtxt").input == pbtxt.parse(released).input
    assert (repo / "morphocam_hushem_explain").resolve() == (serving_repository / "morphocam_hushem_explain").resolve()
    assert (serving_repository / "morphocam_hushem" / "config.pbtxt").read_text() == released
    assert describe(serving_repository / "morphocam_hushem" / "config.pbtxt")["instances"] == ExportConfig().instances
    assert variant.label() == "openvino/fp32, 3x1, delay 750 us, preferred [4, 8]"
    assert ServingVariant().is_default() and ServingVariant().label() == "as released"

    # the native config: threads are ONNX Runtime's intra-op count; the queue policy can be dropped
    native = ServingVariant(instances=1, threads=2, classifier_engine="native", queue_policy=False)
    repo = write_variant(serving_repository, "morphocam_hushem", native, tmp_path / "repo2")
    got = describe(repo / "morphocam_hushem" / "config.pbtxt")
    assert (got["classifier_engine"], got["instances"], got["threads"], got["queue_policy"]) == ("native", 1, 2, False)
    with pytest.raises(ValueError, match="Python-backend"):
        write_variant(serving_repository, "morphocam_hushem", ServingVariant(engine="openvino", classifier_engine="native"),
                      tmp_path / "repo3")


def test_trust_benchmark_smoke(hushem_dir, repo_root, tmp_path):
    """The trust benchmark on the released HuSHem model, small: JSON + PNG, the graph equals the reference."""
    from morphocam.benchmarks.trust import TrustBenchConfig, run

    ckpt = repo_root / "results" / "training" / "hushem" / "model.safetensors"
    cfg = TrustBenchConfig(checkpoints=[ckpt], data_root=hushem_dir.parent, output_dir=tmp_path, cross_images=16,
                           corruption_images=8, latency_seconds=0.5, latency_batch=4)
    (res,) = run(cfg)
    assert (tmp_path / "trust.json").is_file() and (tmp_path / "trust_hushem.png").is_file()
    g = res["graph_vs_reference"]
    assert g["in_domain_mismatches"] == 0 and g["set_mismatches"] == 0 and g["max_abs_prob_diff"] < 1e-4
    assert res["corruptions"]["images"] == 8 and len(res["corruptions"]["rows"]) == 1 + 8 * 3
    comparison = res["ood"]["comparison"]
    # the served score (final features + a backbone stage) is compared with each of its parts alone
    served = next(v for name, v in comparison.items() if name.endswith("(served)"))
    assert {"mahalanobis_l2 final features only", "mahalanobis_l2 stage 6 only"} <= set(comparison)
    assert set(served) >= {"other_dataset", "blank", "uniform_noise", "blank_and_noise"}
    assert res["calibration"]["n_test"] == res["fit"]["data"]["sizes"]["test"]
