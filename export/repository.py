"""Writes the agreed Triton model repository layout, all or nothing.

Every model folder is built in a staging folder beside the output repository; only when every
checkpoint has passed every check are the finished folders renamed into place (a model folder
that already exists is replaced whole). A failure at any step leaves the output untouched.

Layout (target ``cpu``)::

    <repo>/morphocam_<dataset>/          config.pbtxt (Triton's ONNX Runtime backend), configs/python-ort.pbtxt,
                                         configs/openvino.pbtxt (Python-backend alternatives), labels.txt,
                                         model_card.json, warmup/IMAGES, 1/model.py,
                                         1/morphocam_engines.py (the engine factory model.py imports),
                                         1/model.onnx(.sha256) [1/model_int8.onnx], 1/contract.json
    <repo>/morphocam_<dataset>_explain/  config.pbtxt, labels.txt, 1/model.py, 1/explain_core.py,
                                         1/morphocam_net.py, 1/model.safetensors(.sha256)

The ``.py`` files come unchanged from ``serving/triton_models/`` and the core package's engine factory
(:data:`MODEL_FILES`), so that each model folder runs without the project installed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphocam import engines as engine_factory
from morphocam.atomic import replace_dir
from morphocam.machine import cpu_name
from morphocam.contract import DATASET_CLASSES, EXPLAIN_SUFFIX, INPUT_NAME, InputContract, model_name_for

from .errors import ExportError
from . import data as D
from . import engines as E
from . import pbtxt
from .config import ExportConfig

# Which serving source becomes which file in a model's version folder ({file in 1/: source file}).
# An absolute source path (the core package's engine factory) is taken as it is.
MODEL_FILES = {
    "classifier": {"model.py": "classifier.py",
                   engine_factory.VERSION_FOLDER_NAME: Path(engine_factory.__file__).resolve()},
    "explainer": {"model.py": "explainer.py", "explain_core.py": "explain_core.py",
                  "morphocam_net.py": "morphocam_net.py"},
}


def log(cfg: ExportConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[export] {msg}", flush=True)


def load_verified(path: Path):
    """Checkpoint -> (net, meta, contract, sha256), or :class:`morphocam.training.checkpoint.CheckpointError`."""
    from morphocam.training.checkpoint import CheckpointError, contract_of, load_checkpoint, read_metadata, verify_sha256

    path = Path(path)
    meta = read_metadata(path)  # missing file, not safetensors, truncated header, missing metadata
    try:
        contract = contract_of(meta)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid contract in metadata ({exc})") from None
    if not contract.dataset:
        raise CheckpointError(f"{path}: contract names no dataset, so the model has no name")
    known = DATASET_CLASSES.get(contract.dataset)
    if known is not None and tuple(contract.classes) != tuple(known):
        raise CheckpointError(f"{path}: classes {list(contract.classes)} do not match the {contract.dataset} "
                              f"contract {list(known)} (count {len(contract.classes)} vs {len(known)})")
    digest = verify_sha256(path)  # sidecar mismatch
    net, meta = load_checkpoint(path, verify=False)  # truncated weights, head/class-count mismatch
    return net, meta, contract, digest


@dataclass
class ModelResult:
    name: str
    folders: list[Path] = field(default_factory=list)
    card: dict = field(default_factory=dict)


def _serving_sources(cfg: ExportConfig, kind: str) -> dict[str, Path]:
    """{file in the version folder: its source under ``cfg.serving_models_dir``}; all must exist."""
    sources = {dest: Path(cfg.serving_models_dir) / src for dest, src in MODEL_FILES[kind].items()}
    for dest, src in sources.items():
        if not src.is_file():
            raise ExportError(f"serving model file {src} is missing: the repository needs it as 1/{dest} "
                              f"(written by the serving stage; pass --serving-models-dir)")
    return sources


def _copy_sources(cfg: ExportConfig, kind: str, version_dir: Path) -> None:
    for dest, src in _serving_sources(cfg, kind).items():
        shutil.copyfile(src, version_dir / dest)


def _eval_set(cfg: ExportConfig, checkpoint: Path, root: Path, contract: InputContract):
    test = D.load_test_split(checkpoint)
    if test is not None:
        paths, labels, what = test.paths, test.labels, f"test split of the checkpoint ({len(test.paths)} images)"
        recorded = test.probs
    else:
        chosen = D.sample_paths(D.list_dataset(root, contract), 64, seed=1)
        paths, labels, recorded = [p for p, _ in chosen], np.array([l for _, l in chosen]), None
        what = f"{len(paths)} dataset images (no test_predictions.npz beside the checkpoint: not a held-out split)"
    if cfg.eval_limit is not None and len(paths) > cfg.eval_limit:
        idx = D.sample_paths([(str(i), int(l)) for i, l in enumerate(labels)], cfg.eval_limit, seed=2)
        keep = sorted(int(i) for i, _ in idx)
        paths, labels = [paths[i] for i in keep], labels[keep]
        recorded = None if recorded is None else recorded[keep]
        what += f", limited to {len(keep)}"
    return test, D.load_images(root, paths, contract), np.asarray(labels), recorded, what


def _choose(cfg: ExportConfig, ms: list[E.Measurement], int8_kept: bool) -> E.Measurement:
    ref = ms[0]
    if cfg.engine != "auto" or cfg.precision != "auto":
        forced = [m for m in ms if cfg.engine in ("auto", m.engine) and cfg.precision in ("auto", m.precision)]
        if not forced:
            raise ExportError(f"no measured variant matches --engine {cfg.engine} --precision {cfg.precision}")
        return max(forced, key=lambda m: m.images_per_second)
    ok = [m for m in ms if (m.precision == "fp32" or (ref.accuracy - m.accuracy) * 100 <= cfg.release_max_drop + 1e-9)
          and (m.precision != "int8" or int8_kept)]
    best = max(ok, key=lambda m: m.images_per_second)
    # a variant replaces the ONNX Runtime FP32 reference only if it is clearly faster, not by noise
    return best if best.images_per_second > ref.images_per_second * (1 + cfg.speed_margin) else ref


def int8_decision(ms: list[E.Measurement], speed_margin: float, max_drop_points: float) -> tuple[bool, str]:
    """Whether the INT8 graph is kept, and why: its fastest engine must be more than ``speed_margin``
    faster than the fastest FP32 variant and lose at most ``max_drop_points`` accuracy points against
    the ONNX Runtime FP32 reference (``ms[0]``) on the same images."""
    best_fp32 = max(m.images_per_second for m in ms if m.precision == "fp32")
    int8s = [m for m in ms if m.precision == "int8"]
    if not int8s:
        return False, "no engine could run the INT8 graph"
    best = max(int8s, key=lambda m: m.images_per_second)
    drop = (ms[0].accuracy - best.accuracy) * 100
    faster = best.images_per_second > best_fp32 * (1 + speed_margin)
    kept = faster and drop <= max_drop_points
    why = (f"{best.engine} INT8 {best.images_per_second:.1f} img/s vs best FP32 {best_fp32:.1f}; "
           f"accuracy {best.accuracy:.4f} vs FP32 {ms[0].accuracy:.4f} ({drop:+.2f} points drop, bound "
           f"{max_drop_points}); macro-F1 {best.macro_f1:.4f} vs {ms[0].macro_f1:.4f}: "
           + ("kept" if kept else "not kept (" + ", ".join(
               r for r, bad in (("not faster", not faster), ("too much accuracy lost", drop > max_drop_points))
               if bad) + ")"))
    return kept, why


def _measure_cpu(cfg: ExportConfig, version_dir: Path, images, labels, k: int, calibration) -> dict:
    """ORT fp32 (reference), OpenVINO fp32/bf16, and INT8 if asked; picks the released variant."""
    from .quantize import quantize_int8

    threads = cfg.bench_threads
    fp32 = version_dir / "model.onnx"
    variants = [("onnxruntime", fp32, "fp32"), ("openvino", fp32, "fp32")]
    skipped = []
    if E.openvino_bf16_supported():
        variants.append(("openvino", fp32, "bf16"))
    else:
        skipped.append("openvino bf16: this CPU has no native BF16 (OpenVINO OPTIMIZATION_CAPABILITIES lacks "
                       "BF16; the hint would silently run f32)")
        log(cfg, f"  skipped {skipped[-1]}")
    int8_info = None
    if cfg.int8 or cfg.precision == "int8":
        log(cfg, f"  INT8: calibrating on {len(calibration[0])} real images ({calibration[1]})")
        int8_info = quantize_int8(fp32, version_dir / "model_int8.onnx", calibration[0])
        int8_info["calibration"] = calibration[1]
        variants += [("onnxruntime", version_dir / "model_int8.onnx", "int8"),
                     ("openvino", version_dir / "model_int8.onnx", "int8")]
    ms: list[E.Measurement] = []
    ref_probs = None
    for engine, f, precision in variants:
        try:
            runner = E.make_runner(engine, f, precision, threads)
        except Exception as exc:  # noqa: BLE001 - an engine that cannot load is recorded, not fatal
            log(cfg, f"  {engine} {precision}: cannot load ({type(exc).__name__}: {exc})")
            continue
        m, probs = E.measure(runner, f.name, images, labels, ref_probs, k, cfg.bench_batch, cfg.bench_seconds)
        if ref_probs is None:
            ref_probs = probs
        ms.append(m)
        log(cfg, f"  {engine:11s} {precision:4s} {m.images_per_second:7.1f} img/s (batch {cfg.bench_batch}), "
                 f"accuracy {m.accuracy:.4f}, macro-F1 {m.macro_f1:.4f}, agreement with FP32 {m.agreement_with_fp32:.4f}")
    int8_kept, why = False, "not tried (--int8 false)"
    if int8_info is not None:
        int8_kept, why = int8_decision(ms, cfg.speed_margin, cfg.int8_max_drop)
        int8_info.update(kept=int8_kept, decision=why)
        log(cfg, f"  INT8 {why}")
    chosen = _choose(cfg, ms, int8_kept)
    if chosen.precision == "int8":
        int8_kept = True
    if int8_info is not None and not int8_kept:
        (version_dir / "model_int8.onnx").unlink(missing_ok=True)
    return {"measurements": [m.to_dict() for m in ms], "skipped": skipped, "int8": int8_info, "chosen": chosen,
            "rule": f"fastest variant within {cfg.release_max_drop} accuracy points of ONNX Runtime FP32 "
                    f"on the test split and more than {cfg.speed_margin:.0%} faster than it (INT8 only if kept)"}


def _reused_measurements(cfg: ExportConfig, name: str) -> dict | None:
    """Without ``--measure``, the engine measurements of the model card already in the output (same
    model name), marked as reused: a re-export that skips the slow measurement keeps its numbers."""
    old = Path(cfg.output) / name / "model_card.json"
    if not cfg.reuse_measurements or not old.is_file():
        return None
    try:
        card = json.loads(old.read_text())
    except (OSError, ValueError):
        return None
    engines = card.get("engines")
    if not engines:
        return None
    engines.setdefault("reused_from_export", (card.get("export") or {}).get("exported"))
    return engines


@dataclass
class Served:
    """Which engine, precision and graph file the classifier's config.pbtxt names, and the card's
    engine measurements (None when nothing was measured)."""
    engine: str = "onnxruntime"
    precision: str = "fp32"
    model_file: str = "model.onnx"
    card_engines: dict | None = None


def _write_graph(cfg: ExportConfig, net, contract: InputContract, onnx_file: Path, images,
                 trust=None) -> tuple[dict, dict]:
    """Export the ONNX graph (with the fitted trust outputs, if any) and check it against the checkpoint
    on real images: (graph info, parity)."""
    from .onnx_export import export_onnx
    from .parity import check_parity

    log(cfg, f"  exporting ONNX ({cfg.exporter}, opset {cfg.opset})")
    graph = export_onnx(net, contract, onnx_file, cfg.opset, cfg.exporter, trust=trust)
    log(cfg, f"  ONNX: {graph['nodes']} nodes, {graph['bytes'] / 1e6:.1f} MB, exporter {graph['exporter']}; onnx.checker ok")
    par = check_parity(net, onnx_file, images[: cfg.parity_images], contract, cfg.parity_tolerance, cfg.bench_threads,
                       trust=trust)
    log(cfg, f"  parity on {par['images']} real images: max |Δprob| {par['max_abs_prob_diff']:.2e}, "
             f"max |Δlogit| {par['max_abs_logit_diff']:.2e} (tolerance {cfg.parity_tolerance:g}) ok")
    if trust is not None:
        log(cfg, f"  trust parity (+ a blank and a noise frame, IN_DOMAIN {par['synthetic_in_domain']}): max relative "
                 f"|ΔOOD_SCORE| {par['max_rel_ood_score_diff']:.2e}, IN_DOMAIN / PREDICTION_SET mismatches "
                 f"{par['in_domain_mismatches']} / {par['prediction_set_mismatches']}")
    return graph, par


def _cpu_variant(cfg: ExportConfig, name: str, version_dir: Path, root: Path, contract: InputContract, test, images,
                 labels, eval_what: str) -> Served:
    """The CPU target: measure the engines and release the rule's choice, or take the flags as given
    (keeping the measurements of the card already in the output, :func:`_reused_measurements`); then put the classifier's ``model.py``, the engine factory it imports and the contract beside the graph."""
    if cfg.measure:
        calibration = (D.calibration_images(root, contract, test, cfg.calibration_size, cfg.calibration_dir)
                       if (cfg.int8 or cfg.precision == "int8") else None)
        log(cfg, "  measuring CPU engines (speed on this machine, accuracy on the real images above)")
        res = _measure_cpu(cfg, version_dir, images, labels, contract.num_classes, calibration)
        chosen = res.pop("chosen")
        served = Served(chosen.engine, chosen.precision, chosen.model_file)
        served.card_engines = {**res, "threads": engine_factory.EngineSettings(threads=cfg.bench_threads).resolved_threads(),
                               "batch": cfg.bench_batch, "images": eval_what, "cpu": cpu_name(),
                               "released": {"engine": served.engine, "precision": served.precision,
                                            "model_file": served.model_file}}
        log(cfg, f"  released variant: {served.engine} {served.precision} ({served.model_file})")
    else:
        if cfg.precision == "int8":
            raise ExportError("--precision int8 needs --measure true (INT8 is calibrated and checked there)")
        served = Served("openvino" if cfg.engine == "openvino" or cfg.precision == "bf16" else "onnxruntime",
                        "fp32" if cfg.precision == "auto" else cfg.precision,
                        card_engines=_reused_measurements(cfg, name))
    # model.py runs in the Triton stub, where the project is not installed: the factory travels with it.
    _copy_sources(cfg, "classifier", version_dir)
    contract.save(version_dir / "contract.json")
    return served


def _gpu_variant(cfg: ExportConfig, onnx_file: Path, contract: InputContract) -> Served:
    """The GPU targets: a TensorRT plan built here, or Triton's ONNX Runtime backend building it itself."""
    if cfg.target == "tensorrt":
        from .tensorrt_build import build_plan

        log(cfg, "  building TensorRT FP16 plan")
        plan = build_plan(onnx_file, onnx_file.with_name("model.plan"), contract, cfg.max_batch_size)
        onnx_file.unlink()
        return Served("tensorrt", "fp16", "model.plan", {"tensorrt": plan})
    contract.save(onnx_file.with_name("contract.json"))
    return Served("onnxruntime+tensorrt", "fp16")  # gpu-onnx-trt


def _write_classifier_configs(cfg: ExportConfig, name: str, contract: InputContract, model_dir: Path,
                              outputs, served: Served) -> dict:
    """``config.pbtxt`` for Triton's ONNX Runtime / TensorRT backend; for the CPU target also the
    Python-backend alternatives ``configs/<python-ort|openvino>.pbtxt`` (served with
    ``morphocam-serve --classifier-engine``, and the fallback when the native backend cannot be built).
    The released engine/precision/graph (measured) goes to its own alternative; the other runs FP32.
    Every config declares the same ``outputs`` (the graph's, trust outputs included)."""
    common = dict(max_batch_size=cfg.max_batch_size, queue_delay_us=cfg.queue_delay_us, outputs=outputs,
                  max_queue_size=cfg.max_queue_size, queue_timeout_us=cfg.queue_timeout_us, instances=cfg.instances)
    native_file = "model.plan" if cfg.target == "tensorrt" else "model.onnx"
    native = pbtxt.classifier_config(name, contract, target=cfg.target, model_file=native_file,
                                     threads=cfg.threads, **common)
    (model_dir / "config.pbtxt").write_text(pbtxt.to_text(native))
    written = {}
    if cfg.target != "cpu":
        return written
    (model_dir / pbtxt.CONFIGS_DIR).mkdir()
    for config_name, eng in (("python-ort", "onnxruntime"), ("openvino", "openvino")):
        prec, f = (served.precision, served.model_file) if eng == served.engine else ("fp32", "model.onnx")
        alt = pbtxt.classifier_config(name, contract, backend="python", engine=eng, precision=prec, model_file=f,
                                      threads=cfg.threads, **common)
        (model_dir / pbtxt.CONFIGS_DIR / f"{config_name}.pbtxt").write_text(pbtxt.to_text(alt))
        written[config_name] = {"engine": eng, "precision": prec, "model_file": f}
    return written


def _write_classifier_folder(cfg: ExportConfig, name: str, contract: InputContract, model_dir: Path, images,
                             served: Served, outputs) -> tuple[str | None, dict]:
    """labels, the warm-up frame, the configs (:func:`_write_classifier_configs`) and the graph's sha256
    sidecar; returns that sha256 and which Python-backend configs were written."""
    (model_dir / "labels.txt").write_text("\n".join(contract.classes) + "\n")
    (model_dir / pbtxt.WARMUP_DIR).mkdir()
    (model_dir / pbtxt.WARMUP_DIR / INPUT_NAME).write_bytes(np.ascontiguousarray(images[0], np.uint8).tobytes())
    python_configs = _write_classifier_configs(cfg, name, contract, model_dir, outputs, served)
    # Integrity sidecar of the served graph: the classifier refuses a file that does not match it.
    graph_file = model_dir / "1" / served.model_file
    if not graph_file.is_file():
        return None, python_configs
    from morphocam.training.checkpoint import file_sha256

    model_sha256 = file_sha256(graph_file)
    graph_file.with_name(f"{served.model_file}.sha256").write_text(f"{model_sha256}  {served.model_file}\n")
    return model_sha256, python_configs


def _model_card(cfg: ExportConfig, name: str, checkpoint: Path, digest: str, net, meta: dict,
                contract: InputContract, root: Path, graph: dict, par: dict, recorded_diff, served: Served,
                model_sha256: str | None, outputs, python_configs: dict) -> dict:
    """model_card.json: data, contract, network, checkpoint, export checks and engine measurements."""
    return {
        "name": name, "version": 1, "target": cfg.target,
        "data": {"dataset": contract.dataset, "classes": list(contract.classes), "root": str(root),
                 "fingerprint": meta.get("data_fingerprint"), "split": meta.get("split")},
        "contract": contract.to_dict(),
        "model": {"arch": meta["arch"], "cbam": meta["use_cbam"], "weights": meta.get("weights"),
                  "parameters": int(sum(p.numel() for p in net.parameters()))},
        "metrics": meta.get("metrics"),
        "checkpoint": {"file": checkpoint.name, "sha256": digest, "created": meta.get("created"),
                       "code_version": meta.get("code_version")},
        "export": {**graph, "parity": par, "recorded_test_probs_max_abs_diff": recorded_diff,
                   "served_by": "Triton ONNX Runtime backend (config.pbtxt, platform onnxruntime_onnx)"
                                if cfg.target != "tensorrt" else "Triton TensorRT backend",
                   "python_backend_configs": python_configs,
                   "engine": served.engine, "precision": served.precision, "model_file": served.model_file,
                   "outputs": [o[0] for o in outputs], "model_sha256": model_sha256,
                   "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "command": "morphocam-export --checkpoints <checkpoints> --output <repo> --target " + cfg.target},
        "engines": served.card_engines,
    }


def _recorded_diff(cfg: ExportConfig, net, images, recorded, contract: InputContract) -> float | None:
    """Max |Δprob| between PyTorch on the re-decoded test images and what training recorded for them."""
    if recorded is None:
        return None
    from .parity import torch_predict

    n = min(len(images), cfg.parity_images)
    return float(np.max(np.abs(torch_predict(net, images[:n], contract)[1] - recorded[:n])))


def export_one(cfg: ExportConfig, checkpoint: Path, staging: Path) -> ModelResult:
    """One checkpoint -> its classifier folder (and explainer folder) in ``staging``, every check passed."""
    t0 = time.time()
    checkpoint = Path(checkpoint)
    log(cfg, f"{checkpoint}: verifying checkpoint")
    net, meta, contract, digest = load_verified(checkpoint)
    name = model_name_for(contract.dataset)
    log(cfg, f"  {name}: {meta['arch']} + {'CBAM' if meta['use_cbam'] else 'no CBAM'}, classes {list(contract.classes)}, "
             f"{contract.height}x{contract.width}, sha256 {digest[:12]}…")
    root = D.dataset_root(meta, cfg.data_root, contract)
    test, images, labels, recorded, eval_what = _eval_set(cfg, checkpoint, root, contract)
    log(cfg, f"  real images: {eval_what} from {root}")

    model_dir = staging / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    trust = _fit_trust(cfg, net, meta, root, contract) if cfg.trust else None
    graph, par = _write_graph(cfg, net, contract, version_dir / "model.onnx", images, trust)
    outputs = pbtxt.graph_outputs(version_dir / "model.onnx")  # every config declares what the graph computes
    served = (_cpu_variant(cfg, name, version_dir, root, contract, test, images, labels, eval_what)
              if cfg.target == "cpu" else _gpu_variant(cfg, version_dir / "model.onnx", contract))
    model_sha256, python_configs = _write_classifier_folder(cfg, name, contract, model_dir, images, served, outputs)
    card = _model_card(cfg, name, checkpoint, digest, net, meta, contract, root, graph, par,
                       _recorded_diff(cfg, net, images, recorded, contract), served, model_sha256,
                       outputs, python_configs)
    card["trust"] = None if trust is None else {**trust.card, "outputs": TRUST_CONTRACT}
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    result = ModelResult(name, [model_dir], card)

    if cfg.explain:
        exp_name = name + EXPLAIN_SUFFIX
        exp_dir = staging / exp_name
        (exp_dir / "1").mkdir(parents=True)
        _copy_sources(cfg, "explainer", exp_dir / "1")
        shutil.copyfile(checkpoint, exp_dir / "1" / "model.safetensors")
        (exp_dir / "1" / "model.safetensors.sha256").write_text(f"{digest}  model.safetensors\n")
        (exp_dir / "labels.txt").write_text("\n".join(contract.classes) + "\n")
        exp_cfg = pbtxt.explainer_config(exp_name, contract, digest, max_batch_size=cfg.explain_max_batch_size,
                                         queue_delay_us=cfg.explain_queue_delay_us, target=cfg.target)
        (exp_dir / "config.pbtxt").write_text(pbtxt.to_text(exp_cfg))
        result.folders.append(exp_dir)
    log(cfg, f"  {name}: done in {time.time() - t0:.1f}s")
    return result


TRUST_CONTRACT = {
    "PROBABILITIES": "FP32 [n, K], softmax(LOGITS / T): calibrated by the temperature below",
    "LOGITS": "FP32 [n, K], unchanged (uncalibrated)",
    "OOD_SCORE": "FP32 [n, 1], distance to the training data relative to the threshold: 1.0 = threshold, "
                 "higher = less like the training data",
    "IN_DOMAIN": "BOOL [n, 1], OOD_SCORE <= 1",
    "PREDICTION_SET": "BOOL [n, K], split-conformal set: contains the true class with probability >= coverage "
                      "for frames like the calibration frames (in-domain); the top class is always in it",
}


def _fit_trust(cfg: ExportConfig, net, meta: dict, root: Path, contract: InputContract):
    """Temperature, OOD statistics and conformal qhat from the checkpoint's own split (trust_fit.py)."""
    from .trust_fit import fit_trust

    log(cfg, f"  fitting trust outputs (coverage {cfg.coverage:.0%}, OOD acceptance {cfg.ood_acceptance:.0%}) "
             "on the checkpoint's re-derived split")
    trust, _ = fit_trust(net, meta, root, contract, cfg.coverage, cfg.ood_acceptance,
                         log=lambda m: log(cfg, m), ood_stage=cfg.ood_stage)
    t = trust.card["test"]
    log(cfg, f"  trust: T = {trust.temperature:.3f}, OOD stage {trust.ood_stage}, threshold {trust.ood_threshold:.2f}, RAPS lam {trust.lam:g}, "
             f"qhat {trust.qhat:.4f}; test: ECE {t['ece_before']:.3f} -> {t['ece_after']:.3f}, coverage "
             f"{t['conformal_coverage']:.3f}, mean set size {t['mean_set_size']:.2f}, in-domain {t['in_domain_rate']:.3f}")
    return trust


def _commit(staged: Path, out: Path) -> None:
    """Rename one finished model folder into the repository, replacing an older one whole."""
    replace_dir(staged, out / staged.name)


def write_repository(cfg: ExportConfig) -> list[ModelResult]:
    """Export every checkpoint into staging, then move the model folders into ``cfg.output``."""
    if not cfg.checkpoints:
        raise ExportError("no checkpoints given (--checkpoints a.safetensors,b.safetensors)")
    if cfg.target == "tensorrt":
        from .tensorrt_build import require_tensorrt

        require_tensorrt()  # before any work
    if cfg.target == "cpu":
        _serving_sources(cfg, "classifier")
    if cfg.explain:
        _serving_sources(cfg, "explainer")
    out = Path(cfg.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
    try:
        results = []
        for ckpt in cfg.checkpoints:
            res = export_one(cfg, ckpt, staging)
            if any(r.name == res.name for r in results):
                raise ExportError(f"two checkpoints export the same model {res.name}")
            results.append(res)
        out.mkdir(exist_ok=True)
        for res in results:
            for folder in res.folders:
                _commit(folder, out)
            res.folders = [out / f.name for f in res.folders]
        return results
    finally:
        shutil.rmtree(staging, ignore_errors=True)
