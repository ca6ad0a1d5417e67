"""``morphocam-bench trust``: are the served probabilities calibrated, the sets honest, the OOD flag useful?

Per checkpoint, fitted exactly as ``morphocam-export`` fits it (:func:`morphocam.export.trust_fit.fit_trust`
on the checkpoint's re-derived split), then measured on data none of the fits saw:

- **calibration**: ECE and reliability diagram on the test split, before and after the temperature;
- **conformal**: empirical coverage (with a 95 % Wilson interval) and mean set size on the test split;
- **OOD scores compared** (why the graph uses Mahalanobis on L2-normalised features): AUROC and FPR at
  95 % TPR of energy, max-softmax, feature kNN, raw and normalised Mahalanobis — in-domain test frames
  against the other dataset's frames and against blank / uniform / noise frames;
- **corruptions** at three severities (:mod:`morphocam.benchmarks.corruptions`), run through the
  exported graph with ONNX Runtime: accuracy, share flagged out-of-domain, accuracy on the frames
  still accepted, set coverage and size — so one sees whether the flag rises as accuracy falls;
- **cost**: the same graph with and without the trust outputs, in-process ONNX Runtime, same run.

Writes ``trust.json`` and ``trust_<dataset>.png`` under the output folder and prints the tables.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from morphocam import plotting
from morphocam.atomic import atomic_write_text
from morphocam.config import option
from morphocam.stats import wilson_interval
from morphocam.contract import (OUTPUT_IN_DOMAIN, OUTPUT_OOD_SCORE, OUTPUT_PREDICTION_SET,
                                OUTPUT_PROBABILITIES)


@dataclass
class TrustBenchConfig:
    checkpoints: list[Path] = option("comma-separated checkpoints (model.safetensors)",
                                     [Path("results/training/hushem/model.safetensors"),
                                      Path("results/training/smids/model.safetensors")])
    data_root: Optional[Path] = option("folder holding <dataset>/ (default: as morphocam-export finds it)", None)
    output_dir: Path = option("where trust.json and the PNGs go", Path("results/benchmarks/trust"))
    coverage: float = option("conformal coverage (as the exporter's --coverage)", 0.9)
    ood_acceptance: float = option("in-domain acceptance of the OOD threshold (as --ood-acceptance)", 0.95)
    ood_stage: int = option("backbone stage of the second OOD distance (as the exporter's --ood-stage; -1: none)", 6)
    cross_images: int = option("frames of the other dataset used as out-of-domain", 400)
    corruption_images: int = option("test frames per corruption and severity (seeded, class-balanced)", 200)
    knn_k: int = option("k of the feature-kNN baseline", 1)
    latency_batch: int = option("batch of the latency comparison", 8)
    latency_seconds: float = option("seconds per latency measurement", 3.0)
    threads: int = option("threads for PyTorch and ONNX Runtime (0 = all cores)", 0)


def _other_dataset_frames(root: Path, dataset: str, size: tuple[int, int], n: int) -> tuple[np.ndarray, str]:
    from morphocam.preprocess import is_image_path, load_frame

    other = "smids" if dataset == "hushem" else "hushem"
    folder = root.parent / other
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))
    if not files:
        return np.zeros((0, *size, 3), np.uint8), f"{other}: not found at {folder}"
    rng = np.random.default_rng(0)
    files = [files[i] for i in sorted(rng.permutation(len(files))[:n])]
    return np.stack([load_frame(p, *size) for p in files]), f"{len(files)} {other} frames ({folder})"


def _score_methods(params, parts, knn_k: int) -> dict:
    """Every candidate OOD score as a function (features, logits, stage features) -> score (higher = more
    out-of-domain); the served one first, then its two parts alone when it combines a stage."""
    from morphocam.export import trust_math as TM

    tr = parts["train"]
    # raw-feature Mahalanobis: the same fit without the L2 normalisation
    means = np.stack([tr.features[tr.labels == k].mean(0) for k in range(tr.logits.shape[1])])
    from sklearn.covariance import LedoitWolf

    prec = LedoitWolf(assume_centered=True).fit(tr.features - means[tr.labels]).precision_
    white = np.linalg.cholesky(prec)

    def maha_raw(f, lo, st):
        g, m = f @ white, means @ white
        return np.sqrt(((g[:, None] - m[None]) ** 2).sum(-1).min(1))

    served = ({"mahalanobis_l2 (served)": lambda f, lo, st: params.ood_combined(f, st)}
              if params.ood_stage_fit is None else
              {f"mahalanobis_l2 final + stage {params.ood_stage} (served)": lambda f, lo, st: params.ood_combined(f, st),
               "mahalanobis_l2 final features only": lambda f, lo, st: params.ood.distance(f),
               f"mahalanobis_l2 stage {params.ood_stage} only": lambda f, lo, st: params.ood_stage_fit.distance(st)})
    return {
        **served,
        "mahalanobis_raw": maha_raw,
        f"knn_cosine_k{knn_k}": lambda f, lo, st: TM.knn_distance(f, tr.features, knn_k),
        "energy": lambda f, lo, st: TM.energy_score(lo, params.temperature),
        "max_softmax": lambda f, lo, st: -TM.softmax(lo, params.temperature).max(1),
    }


def _cpu_ms_per_image(runner, frames: np.ndarray, batch: int, seconds: float) -> float:
    """Process CPU time per image (``time.process_time``) of a 1-thread session: other processes on a
    shared machine stretch wall time, much less the CPU time this process itself spends."""
    x = np.ascontiguousarray(np.concatenate([frames] * int(np.ceil(batch / len(frames))))[:batch])
    runner(x)
    n, c0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 4 * batch:
        runner(x)
        n += batch
    return 1000 * (time.process_time() - c0) / n


def _latency(onnx_plain: Path, onnx_trust: Path, frames: np.ndarray, batch: int, seconds: float, threads: int,
             rounds: int = 5) -> dict:
    """The cost of the trust outputs: the same graph without and with them, in alternating rounds
    (load changes between rounds on a shared machine), best round of each kept — wall-clock images/s
    with the served thread count, and CPU ms per image with one thread."""
    from morphocam.export.engines import all_outputs_runner, throughput

    # every output requested, as the served classifier requests every output its config declares
    graphs = {"without_trust": onnx_plain, "with_trust": onnx_trust}
    served = {name: all_outputs_runner(f, threads) for name, f in graphs.items()}
    single = {name: all_outputs_runner(f, 1) for name, f in graphs.items()}
    out: dict = {name: {} for name in graphs}
    for b in (1, batch):
        best = {name: 0.0 for name in graphs}
        cpu = {name: float("inf") for name in graphs}
        for _ in range(rounds):
            for name in graphs:
                best[name] = max(best[name], throughput(served[name], frames, b, seconds / rounds))
                cpu[name] = min(cpu[name], _cpu_ms_per_image(single[name], frames, b, seconds / rounds))
        for name in graphs:
            out[name][f"batch_{b}_img_s"] = best[name]
            out[name][f"batch_{b}_cpu_ms_per_image_1_thread"] = cpu[name]
        out[f"added_ms_per_image_batch_{b}"] = 1000 * (1 / best["with_trust"] - 1 / best["without_trust"])
        out[f"added_cpu_ms_per_image_batch_{b}"] = cpu["with_trust"] - cpu["without_trust"]
    out.update(batch=batch, rounds=rounds, rule="best of alternating rounds")
    return out


def _run_graph(runner, frames: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    from morphocam.export.engines import run_named

    chunks = [run_named(runner, frames[i:i + batch]) for i in range(0, len(frames), batch)]
    return {n: np.concatenate([c[n] for c in chunks]) for n in runner.output_names}


def _set_stats(out: dict, labels: np.ndarray) -> dict:
    sets = out[OUTPUT_PREDICTION_SET]
    pred = out[OUTPUT_PROBABILITIES].argmax(1)
    inside = out[OUTPUT_IN_DOMAIN][:, 0]
    idx = np.arange(len(labels))
    return {"n": int(len(labels)), "accuracy": float(np.mean(pred == labels)),
            "ood_rate": float(1 - inside.mean()),
            "accuracy_in_domain": float(np.mean(pred[inside] == labels[inside])) if inside.any() else None,
            "coverage": float(sets[idx, labels].mean()), "mean_set_size": float(sets.sum(1).mean())}


def run_one(cfg: TrustBenchConfig, checkpoint: Path) -> dict:
    from morphocam.export import data as D
    from morphocam.export import trust_math as TM
    from morphocam.export.engines import all_outputs_runner
    from morphocam.machine import cpu_name
    from morphocam.export.onnx_export import export_onnx
    from morphocam.export.repository import load_verified
    from morphocam.export.trust_fit import fit_trust, pooled_features

    from .corruptions import CORRUPTIONS, SEVERITIES, corrupt, empty_frames

    t0 = time.time()
    net, meta, contract, _ = load_verified(checkpoint)
    root = D.dataset_root(meta, cfg.data_root, contract)
    ds = contract.dataset
    print(f"[trust] {ds}: fitting as the exporter does ({checkpoint})", flush=True)
    params, parts = fit_trust(net, meta, root, contract, cfg.coverage, cfg.ood_acceptance,
                              log=lambda m: print(f"[trust] {m.strip()}", flush=True), ood_stage=cfg.ood_stage)
    test = parts["test"]
    size = (contract.height, contract.width)

    # ---- calibration and conformal on the test split
    before, after = TM.softmax(test.logits), TM.softmax(test.logits, params.temperature)
    sets = TM.prediction_sets(after, params.qhat, params.lam, params.k_reg)
    covered = int(sets[np.arange(len(test.labels)), test.labels].sum())
    result = {
        "dataset": ds, "checkpoint": str(checkpoint), "fit": params.card,
        "calibration": {"temperature": params.temperature, "n_test": int(len(test.labels)),
                        "ece_before": TM.expected_calibration_error(before, test.labels),
                        "ece_after": TM.expected_calibration_error(after, test.labels),
                        "reliability_before": TM.reliability_bins(before, test.labels),
                        "reliability_after": TM.reliability_bins(after, test.labels)},
        "conformal": {"nominal": cfg.coverage, "coverage": covered / len(test.labels),
                      "coverage_ci95": wilson_interval(covered, len(test.labels)), "mean_set_size": float(sets.sum(1).mean()),
                      "set_size_counts": {int(k): int(v) for k, v in zip(*np.unique(sets.sum(1), return_counts=True))},
                      "lam": params.lam, "qhat": params.qhat},
    }

    # ---- OOD score comparison (features through PyTorch)
    cross, cross_what = _other_dataset_frames(root, ds, size, cfg.cross_images)
    empties = empty_frames(*size)
    ood_sets = {"other_dataset": cross, **empties}
    feats = {name: pooled_features(net, frames, contract, stage=params.ood_stage)
             for name, frames in ood_sets.items() if len(frames)}
    methods = _score_methods(params, parts, cfg.knn_k)
    comparison = {}
    for mname, fn in methods.items():
        s_in = fn(test.features, test.logits, test.stage)
        row = {}
        for oname, (f, lo, st) in feats.items():
            auroc, fpr = TM.auroc_fpr95(s_in, fn(f, lo, st))
            row[oname] = {"auroc": auroc, "fpr_at_95_tpr": fpr}
        row["blank_and_noise"] = dict(zip(("auroc", "fpr_at_95_tpr"), TM.auroc_fpr95(
            s_in, np.concatenate([fn(*feats[k]) for k in empties]))))
        comparison[mname] = row
    served = {name: float(np.mean(params.ood_combined(f, st) / params.ood_threshold > 1.0))
              for name, (f, _, st) in feats.items()}
    served["test_in_domain"] = float(np.mean(params.ood_combined(test.features, test.stage) / params.ood_threshold <= 1.0))
    result["ood"] = {"other_dataset": cross_what, "empty_frames_per_kind": int(len(empties["blank"])),
                     "comparison": comparison, "served_flag_rate": served,
                     "threshold": params.ood_threshold, "acceptance": cfg.ood_acceptance}

    # ---- corruptions and latency through the exported graph (ONNX Runtime)
    with tempfile.TemporaryDirectory(prefix="morphocam-trust-") as tmp:
        plain, with_trust = Path(tmp) / "plain.onnx", Path(tmp) / "trust.onnx"
        export_onnx(net, contract, plain)
        export_onnx(net, contract, with_trust, trust=params)
        sess = all_outputs_runner(with_trust, cfg.threads)
        pick = D.sample_paths([(str(i), int(y)) for i, y in enumerate(test.labels)], cfg.corruption_images, seed=3)
        chosen = np.array(sorted(int(p) for p, _ in pick))
        images, labels = test.images[chosen], test.labels[chosen]
        clean = _run_graph(sess, images)
        corr = {"clean": _set_stats(clean, labels)}
        for name in CORRUPTIONS:
            for s in SEVERITIES:
                corr[f"{name}/{s}"] = _set_stats(_run_graph(sess, corrupt(images, name, s)), labels)
        result["corruptions"] = {"images": int(len(chosen)), "rows": corr}
        # the served graph must agree with the reference maths on the clean frames
        ref = params.reference(*pooled_features(net, images, contract, stage=params.ood_stage))
        result["graph_vs_reference"] = {
            "max_abs_prob_diff": float(np.abs(clean[OUTPUT_PROBABILITIES] - ref[OUTPUT_PROBABILITIES]).max()),
            "max_abs_ood_diff": float(np.abs(clean[OUTPUT_OOD_SCORE] - ref[OUTPUT_OOD_SCORE]).max()),
            "in_domain_mismatches": int((clean[OUTPUT_IN_DOMAIN] != ref[OUTPUT_IN_DOMAIN]).sum()),
            "set_mismatches": int((clean[OUTPUT_PREDICTION_SET] != ref[OUTPUT_PREDICTION_SET]).sum())}
        result["latency"] = {**_latency(plain, with_trust, images[:32], cfg.latency_batch, cfg.latency_seconds,
                                        cfg.threads),
                             "cpu": cpu_name(), "threads": sess.threads,
                             "load_average_1min_at_start": os.getloadavg()[0],
                             "note": "in-process ONNX Runtime, both graphs in the same run, on a shared machine"}
        del clean
    result["seconds"] = time.time() - t0
    return result


def _plot(res: dict, path: Path) -> None:
    plt = plotting.pyplot()
    fig, axes = plotting.subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    for key, label in (("reliability_before", "T = 1"), ("reliability_after", f"T = {res['calibration']['temperature']:.2f}")):
        pts = res["calibration"][key]
        ax.plot([p["confidence"] for p in pts], [p["accuracy"] for p in pts], "o-", label=label)
    ax.plot([0, 1], [0, 1], "k:")
    c = res["calibration"]
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{res['dataset']}: reliability (test, n={c['n_test']})\nECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}")
    ax.legend()

    ax = axes[1]
    comp = res["ood"]["comparison"]
    names = list(comp)
    sets = ["other_dataset", "blank_and_noise"]
    x = np.arange(len(names))
    for i, s in enumerate(sets):
        ax.bar(x + (i - 0.5) * 0.38, [comp[n].get(s, {}).get("auroc", np.nan) for n in names], 0.38, label=s)
    ax.axhline(0.95, color="k", ls=":")
    ax.set_xticks(x, [n.replace(" (served)", "*") for n in names], rotation=20, ha="right")
    ax.set(ylim=(0, 1.02), ylabel="AUROC (test frames vs OOD)", title="OOD scores (* = served)")
    ax.legend(fontsize=8)

    ax = axes[2]
    rows = res["corruptions"]["rows"]
    kinds = sorted({k.split("/")[0] for k in rows if "/" in k})
    for i, kind in enumerate(kinds):
        col = plt.cm.tab10(i)
        xs = [0, 1, 2, 3]
        acc = [rows["clean"]["accuracy"]] + [rows[f"{kind}/{s}"]["accuracy"] for s in (1, 2, 3)]
        ood = [rows["clean"]["ood_rate"]] + [rows[f"{kind}/{s}"]["ood_rate"] for s in (1, 2, 3)]
        ax.plot(xs, acc, "-", color=col, label=kind)
        ax.plot(xs, ood, "--", color=col)
    ax.set(xlabel="severity (0 = clean)", ylabel="accuracy (solid) / flagged OOD (dashed)", ylim=(0, 1.02),
           title=f"corruptions ({res['corruptions']['images']} test frames)")
    ax.legend(fontsize=7, ncol=2)
    plotting.save(fig, path, dpi=100)


def table(results: list[dict]) -> str:
    lines = ["| dataset | T | ECE test before -> after | coverage (95% CI), nominal | mean set size | "
             "AUROC other dataset / blank+noise (served) | flagged: other dataset | test frames in-domain | "
             "added CPU ms/image, 1 thread (batch 1 / N) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, k, o, lat = r["calibration"], r["conformal"], r["ood"], r["latency"]
        served = next(v for name, v in o["comparison"].items() if name.endswith("(served)"))
        lines.append(f"| {r['dataset']} | {c['temperature']:.2f} | {c['ece_before']:.3f} -> {c['ece_after']:.3f} | "
                     f"{k['coverage']:.3f} ({k['coverage_ci95'][0]:.2f}-{k['coverage_ci95'][1]:.2f}), {k['nominal']:.2f} | "
                     f"{k['mean_set_size']:.2f} | {served.get('other_dataset', {}).get('auroc', float('nan')):.3f} / "
                     f"{served['blank_and_noise']['auroc']:.3f} | {o['served_flag_rate'].get('other_dataset', float('nan')):.3f} | "
                     f"{o['served_flag_rate']['test_in_domain']:.3f} | "
                     f"{lat['added_cpu_ms_per_image_batch_1']:+.2f} / "
                     f"{lat['added_cpu_ms_per_image_batch_' + str(lat['batch'])]:+.2f} |")
    return "\n".join(lines)


def run(cfg: TrustBenchConfig) -> list[dict]:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    results = []
    for ckpt in cfg.checkpoints:
        res = run_one(cfg, Path(ckpt))
        _plot(res, out / f"trust_{res['dataset']}.png")
        results.append(res)
        print(json.dumps({k: res[k] for k in ("calibration", "conformal")}, default=str)[:600])
    atomic_write_text(out / "trust.json", json.dumps(results, indent=2, default=float) + "\n")
    print(table(results))
    for r in results:
        print(f"\n{r['dataset']}: OOD AUROC (test frames vs ...)")
        for m, row in r["ood"]["comparison"].items():
            print(f"  {m:26s} " + "  ".join(f"{k} {v['auroc']:.3f}" for k, v in row.items()))
        print(f"{r['dataset']}: corruptions (accuracy / flagged OOD / coverage / set size)")
        for k, v in r["corruptions"]["rows"].items():
            print(f"  {k:18s} {v['accuracy']:.3f} / {v['ood_rate']:.3f} / {v['coverage']:.3f} / {v['mean_set_size']:.2f}")
    return results
