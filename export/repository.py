"""Writes the agreed Triton model repository layout, all or nothing.

Every model folder is built in a staging folder beside the output repository; only when every
checkpoint has passed every check are the finished folders renamed into place (a model folder
that already exists is replaced whole). A failure at any step leaves the output untouched.

Layout (target ``cpu``)::

    <repo>/morphocam_<dataset>/          config.pbtxt (Triton's ONNX Runtime backend), configs/python-ort.pbtxt,
                                         configs/openvino.pbtxt (Python-backend alternatives), labels.txt,
                                         model_card.json, warmup/IMAGES, 1/model.py,
                                         1/model.onnx(.sha256) [1/model_int8.onnx], 1/contract.json
    <repo>/morphocam_<dataset>_explain/  config.pbtxt, labels.txt, 1/model.py, 1/explain_core.py,
                                         1/morphocam_net.py, 1/model.safetensors(.sha256)

The ``.py`` files come from ``serving/triton_models/`` (:data:`MODEL_FILES`) unchanged, so that each
model folder runs without the project installed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphocam.atomic import replace_dir
from morphocam.contract import DATASET_CLASSES, EXPLAIN_SUFFIX, INPUT_NAME, InputContract, model_name_for

from .errors import ExportError
from . import data as D
from . import engines as E
from . import pbtxt
from .config import ExportConfig

# Which serving source becomes which file in a model's version folder ({file in 1/: source file}).
MODEL_FILES = {
    "classifier": {"model.py": "classifier.py"},
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
        best_fp32 = max(m.images_per_second for m in ms if m.precision == "fp32")
        int8s = [m for m in ms if m.precision == "int8"]
        if not int8s:
            why = "no engine could run the INT8 graph"
        else:
            best = max(int8s, key=lambda m: m.images_per_second)
            drop = (ms[0].accuracy - best.accuracy) * 100
            faster = best.images_per_second > best_fp32 * (1 + cfg.speed_margin)
            int8_kept = faster and drop <= cfg.int8_max_drop
            why = (f"{best.engine} INT8 {best.images_per_second:.1f} img/s vs best FP32 {best_fp32:.1f}; "
                   f"accuracy {best.accuracy:.4f} vs FP32 {ms[0].accuracy:.4f} ({drop:+.2f} points drop, bound "
                   f"{cfg.int8_max_drop}); macro-F1 {best.macro_f1:.4f} vs {ms[0].macro_f1:.4f}: "
                   + ("kept" if int8_kept else "not kept (" + ", ".join(
                       r for r, bad in (("not faster", not faster), ("too much accuracy lost", drop > cfg.int8_max_drop))
                       if bad) + ")"))
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


def _write_classifier_configs(cfg: ExportConfig, name: str, contract: InputContract, model_dir: Path,
                              outputs, engine: str, precision: str, model_file: str) -> dict:
    """``config.pbtxt`` for Triton's ONNX Runtime / TensorRT backend; for the CPU target also the
    Python-backend alternatives ``configs/<python-ort|openvino>.pbtxt`` (served with
    ``morphocam-serve --classifier-engine``, and the fallback when the native backend cannot be built).
    The released engine/precision/graph (measured) goes to its own alternative; the other runs FP32."""
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
        prec, f = (precision, model_file) if eng == engine else ("fp32", "model.onnx")
        alt = pbtxt.classifier_config(name, contract, backend="python", engine=eng, precision=prec, model_file=f,
                                      threads=cfg.threads, **common)
        (model_dir / pbtxt.CONFIGS_DIR / f"{config_name}.pbtxt").write_text(pbtxt.to_text(alt))
        written[config_name] = {"engine": eng, "precision": prec, "model_file": f}
    return written


def export_one(cfg: ExportConfig, checkpoint: Path, staging: Path) -> ModelResult:
    from .onnx_export import export_onnx
    from .parity import check_parity

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
    onnx_file = version_dir / "model.onnx"
    log(cfg, f"  exporting ONNX ({cfg.exporter}, opset {cfg.opset})")
    graph = export_onnx(net, contract, onnx_file, cfg.opset, cfg.exporter)
    log(cfg, f"  ONNX: {graph['nodes']} nodes, {graph['bytes'] / 1e6:.1f} MB, exporter {graph['exporter']}; onnx.checker ok")
    par = check_parity(net, onnx_file, images[: cfg.parity_images], contract, cfg.parity_tolerance, cfg.bench_threads)
    log(cfg, f"  parity on {par['images']} real images: max |Δprob| {par['max_abs_prob_diff']:.2e}, "
             f"max |Δlogit| {par['max_abs_logit_diff']:.2e} (tolerance {cfg.parity_tolerance:g}) ok")

    card_engines = None
    engine, precision, model_file = "onnxruntime", "fp32", "model.onnx"
    outputs = pbtxt.graph_outputs(onnx_file)  # the config declares what the graph computes
    if cfg.target == "cpu":
        if cfg.measure:
            calibration = (D.calibration_images(root, contract, test, cfg.calibration_size, cfg.calibration_dir)
                           if (cfg.int8 or cfg.precision == "int8") else None)
            log(cfg, "  measuring CPU engines (speed on this machine, accuracy on the real images above)")
            res = _measure_cpu(cfg, version_dir, images, labels, contract.num_classes, calibration)
            chosen = res.pop("chosen")
            engine, precision, model_file = chosen.engine, chosen.precision, chosen.model_file
            card_engines = {**res, "threads": E.cpu_threads(cfg.bench_threads), "batch": cfg.bench_batch,
                            "images": eval_what, "cpu": E.cpu_name(),
                            "released": {"engine": engine, "precision": precision, "model_file": model_file}}
            log(cfg, f"  released variant: {engine} {precision} ({model_file})")
        else:
            if cfg.precision == "int8":
                raise ExportError("--precision int8 needs --measure true (INT8 is calibrated and checked there)")
            engine = "openvino" if cfg.engine == "openvino" or cfg.precision == "bf16" else "onnxruntime"
            precision = "fp32" if cfg.precision == "auto" else cfg.precision
            card_engines = _reused_measurements(cfg, name)
        _copy_sources(cfg, "classifier", version_dir)
        contract.save(version_dir / "contract.json")
    elif cfg.target == "tensorrt":
        from .tensorrt_build import build_plan

        log(cfg, "  building TensorRT FP16 plan")
        card_engines = {"tensorrt": build_plan(onnx_file, version_dir / "model.plan", contract, cfg.max_batch_size)}
        onnx_file.unlink()
        engine, precision, model_file = "tensorrt", "fp16", "model.plan"
    else:  # gpu-onnx-trt: Triton's ONNX Runtime backend builds the TensorRT engine itself
        engine, precision = "onnxruntime+tensorrt", "fp16"
        contract.save(version_dir / "contract.json")

    (model_dir / "labels.txt").write_text("\n".join(contract.classes) + "\n")
    (model_dir / pbtxt.WARMUP_DIR).mkdir()
    (model_dir / pbtxt.WARMUP_DIR / INPUT_NAME).write_bytes(np.ascontiguousarray(images[0], np.uint8).tobytes())
    python_configs = _write_classifier_configs(cfg, name, contract, model_dir, outputs, engine, precision, model_file)
    # Integrity sidecar of the served graph: the classifier refuses a file that does not match it.
    model_sha256 = None
    if (version_dir / model_file).is_file():
        from morphocam.training.checkpoint import file_sha256

        model_sha256 = file_sha256(version_dir / model_file)
        (version_dir / f"{model_file}.sha256").write_text(f"{model_sha256}  {model_file}\n")

    recorded_diff = None
    if recorded is not None:
        from .parity import torch_predict

        # the re-decoded test images through PyTorch must give the probabilities training recorded
        n = min(len(images), cfg.parity_images)
        recorded_diff = float(np.max(np.abs(torch_predict(net, images[:n], contract)[1] - recorded[:n])))
    card = {
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
                   "engine": engine, "precision": precision, "model_file": model_file,
                   "outputs": [o[0] for o in outputs], "model_sha256": model_sha256,
                   "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "command": "morphocam-export --checkpoints <checkpoints> --output <repo> --target " + cfg.target},
        "engines": card_engines,
    }
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
