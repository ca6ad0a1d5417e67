"""Export stage: ONNX parity on real images, dynamic batch, repository layout and configs through
Triton's protobuf, refusal of bad checkpoints (nothing written), TensorRT skip, regeneration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

from morphocam.contract import (DATASET_CLASSES, EXPLAIN_HEATMAP, EXPLAIN_OVERLAY_PNG, EXPLAIN_TARGET,  # noqa: E402
                                INPUT_NAME, OUTPUT_IN_DOMAIN, OUTPUT_LOGITS, OUTPUT_OOD_SCORE, OUTPUT_PREDICTION_SET,
                                OUTPUT_PROBABILITIES, InputContract)
from morphocam.export.config import ExportConfig  # noqa: E402
from morphocam.export.errors import ExportError  # noqa: E402

CLASSES = DATASET_CLASSES["hushem"]
SIZE = 224


def _meta(contract: InputContract, arch: str = "tf_efficientnet_lite0") -> dict:
    return {"contract": contract.to_dict(), "arch": arch, "use_cbam": True, "dropout": 0.2, "cbam_reduction": 16,
            "weights": "random (test)", "metrics": {"test": {"accuracy": 0.0}}, "data_fingerprint": "test",
            "recipe": {"dataset": contract.dataset}}


def make_checkpoint(path: Path, classes=CLASSES, head_classes: int | None = None, dataset: str = "hushem",
                    seed: int = 0) -> Path:
    import torch

    from morphocam.training.checkpoint import save_checkpoint
    from morphocam.training.model import build_model

    torch.manual_seed(seed)
    net = build_model("tf_efficientnet_lite0", head_classes or len(classes)).eval()
    contract = InputContract(classes=tuple(classes), height=SIZE, width=SIZE, dataset=dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(net, _meta(contract), path)
    return path


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


@pytest.fixture(scope="module")
def real_frames(hushem_dir) -> np.ndarray:
    from morphocam.preprocess import load_frame

    files = [sorted((hushem_dir / c).iterdir())[0] for c in CLASSES] + [sorted((hushem_dir / "Normal").iterdir())[1]]
    return np.stack([load_frame(f, SIZE, SIZE) for f in files])  # 5 real frames


def fast_config(tmp_path: Path, ckpt: Path, hushem_dir: Path, **kw) -> ExportConfig:
    # trust outputs are fitted (features of the whole split) only where a test is about them
    base = dict(checkpoints=[ckpt], output=tmp_path / "repo", data_root=hushem_dir.parent, exporter="legacy",
                measure=False, int8=False, parity_images=4, progress=False, trust=False)
    base.update(kw)
    return ExportConfig(**base)


@pytest.fixture(scope="module")
def cpu_repo(tmp_path_factory, random_ckpt, hushem_dir):
    from morphocam.export.repository import write_repository

    tmp = tmp_path_factory.mktemp("cpu")
    cfg = fast_config(tmp, random_ckpt, hushem_dir, trust=True)
    return cfg.output, write_repository(cfg)


# ------------------------------------------------------------------ graph and parity

def test_onnx_parity_on_real_images_and_dynamic_batch(tmp_path, random_ckpt, real_frames):
    import onnx

    from morphocam.export.engines import reference_runner
    from morphocam.export.onnx_export import export_onnx
    from morphocam.export.parity import check_parity
    from morphocam.training.checkpoint import contract_of, load_checkpoint

    net, meta = load_checkpoint(random_ckpt)
    contract = contract_of(meta)
    f = tmp_path / "model.onnx"
    info = export_onnx(net, contract, f, opset=18, exporter="legacy")
    assert info["opset"] == 18
    onnx.checker.check_model(onnx.load(str(f)))
    par = check_parity(net, f, real_frames, contract, tolerance=1e-4)
    assert par["max_abs_prob_diff"] <= 1e-4 and par["argmax_agreement"] == 1.0
    runner = reference_runner(f, threads=1)
    lo1, p1 = runner(real_frames[:1])
    lo5, p5 = runner(real_frames)
    k = contract.num_classes
    assert lo1.shape == (1, k) and p5.shape == (len(real_frames), k) and lo5.dtype == np.float32
    np.testing.assert_allclose(p5.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(lo1, lo5[:1], atol=1e-4)


def test_parity_failure_is_reported(tmp_path, random_ckpt, real_frames):
    """A graph that disagrees with the checkpoint (other weights) is refused with the numbers."""
    from morphocam.export.onnx_export import export_onnx
    from morphocam.export.parity import check_parity
    from morphocam.training.checkpoint import contract_of, load_checkpoint

    other = make_checkpoint(tmp_path / "other" / "model.safetensors", seed=1)
    net, meta = load_checkpoint(random_ckpt)
    net2, _ = load_checkpoint(other)
    f = tmp_path / "m.onnx"
    export_onnx(net2, contract_of(meta), f, exporter="legacy")
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(net, f, real_frames[:2], contract_of(meta), tolerance=1e-6)


# ------------------------------------------------------------------ repository and configs

def test_cpu_repository_layout(cpu_repo, random_ckpt, repo_root):
    out, results = cpu_repo
    m = out / "morphocam_hushem"
    e = out / "morphocam_hushem_explain"
    for rel in ("config.pbtxt", "configs/python-ort.pbtxt", "configs/openvino.pbtxt", "labels.txt",
                "model_card.json", "warmup/IMAGES", "1/model.py", "1/model.onnx", "1/model.onnx.sha256",
                "1/contract.json"):
        assert (m / rel).is_file(), rel
    for rel in ("config.pbtxt", "labels.txt", "1/model.py", "1/explain_core.py", "1/morphocam_net.py",
                "1/model.safetensors", "1/model.safetensors.sha256"):
        assert (e / rel).is_file(), rel
    assert (m / "labels.txt").read_text().splitlines() == list(CLASSES)
    assert (m / "warmup" / "IMAGES").stat().st_size == SIZE * SIZE * 3
    sources = repo_root / "serving/triton_models"
    assert (m / "1" / "model.py").read_bytes() == (sources / "classifier.py").read_bytes()
    for dest, src in (("model.py", "explainer.py"), ("explain_core.py", "explain_core.py"),
                      ("morphocam_net.py", "morphocam_net.py")):
        assert (e / "1" / dest).read_bytes() == (sources / src).read_bytes(), dest
    assert (m / "1" / "morphocam_engines.py").read_bytes() == (repo_root / "morphocam/engines.py").read_bytes()
    assert InputContract.load(m / "1" / "contract.json").classes == CLASSES
    card = json.loads((m / "model_card.json").read_text())
    from morphocam.training.checkpoint import file_sha256

    assert card["checkpoint"]["sha256"] == file_sha256(random_ckpt)
    assert card["export"]["parity"]["max_abs_prob_diff"] <= 1e-4
    assert card["data"]["dataset"] == "hushem" and card["model"]["arch"] == "tf_efficientnet_lite0"
    assert not [p for p in out.parent.iterdir() if ".staging." in p.name]


def test_classifier_config_parses_into_triton_protobuf(cpu_repo):
    from tritonclient.grpc import model_config_pb2 as mc

    from morphocam.export.pbtxt import parse

    out, _ = cpu_repo
    cfg = parse(out / "morphocam_hushem" / "config.pbtxt")
    assert isinstance(cfg, mc.ModelConfig)
    exported = ExportConfig()
    # Triton's own ONNX Runtime backend, as on NGC; the Python-backend configs are the alternatives below
    assert cfg.name == "morphocam_hushem" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == exported.max_batch_size and cfg.default_model_filename == "model.onnx"
    (inp,) = cfg.input
    assert inp.name == INPUT_NAME and inp.data_type == mc.TYPE_UINT8 and list(inp.dims) == [SIZE, SIZE, 3]
    outs = {o.name: (o.data_type, list(o.dims)) for o in cfg.output}
    assert outs == {OUTPUT_PROBABILITIES: (mc.TYPE_FP32, [4]), OUTPUT_LOGITS: (mc.TYPE_FP32, [4]),
                    OUTPUT_OOD_SCORE: (mc.TYPE_FP32, [1]), OUTPUT_IN_DOMAIN: (mc.TYPE_BOOL, [1]),
                    OUTPUT_PREDICTION_SET: (mc.TYPE_BOOL, [4])}
    assert [o.label_filename for o in cfg.output if o.name == OUTPUT_PROBABILITIES] == ["labels.txt"]
    db = cfg.dynamic_batching
    assert db.max_queue_delay_microseconds == 2000 and not db.preferred_batch_size
    assert db.default_queue_policy.max_queue_size == 256
    assert db.default_queue_policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert set(params) == {"intra_op_thread_count", "inter_op_thread_count"}
    assert int(params["intra_op_thread_count"]) >= 1 and params["inter_op_thread_count"] == "1"
    (w,) = cfg.model_warmup
    assert w.batch_size == 1 and w.inputs[INPUT_NAME].input_data_file == "IMAGES"
    assert list(w.inputs[INPUT_NAME].dims) == [SIZE, SIZE, 3]
    # the Python-backend alternatives: same I/O, batching and warm-up; their own backend and engine
    for name, engine in (("python-ort", "onnxruntime"), ("openvino", "openvino")):
        alt = parse(out / "morphocam_hushem" / "configs" / f"{name}.pbtxt")
        assert alt.backend == "python" and not alt.platform
        params = {k: v.string_value for k, v in alt.parameters.items()}
        assert params == {"engine": engine, "precision": "fp32", "model_file": "model.onnx", "threads": "0"}
        assert (alt.input, alt.output, alt.dynamic_batching, alt.model_warmup, alt.instance_group) == \
            (cfg.input, cfg.output, cfg.dynamic_batching, cfg.model_warmup, cfg.instance_group)


def test_explain_config_parses_into_triton_protobuf(cpu_repo, random_ckpt):
    from tritonclient.grpc import model_config_pb2 as mc

    from morphocam.export.pbtxt import parse
    from morphocam.training.checkpoint import file_sha256

    out, _ = cpu_repo
    cfg = parse(out / "morphocam_hushem_explain" / "config.pbtxt")
    assert cfg.name == "morphocam_hushem_explain" and cfg.backend == "python"
    assert cfg.max_batch_size == ExportConfig().explain_max_batch_size
    ins = {i.name: i for i in cfg.input}
    assert list(ins[INPUT_NAME].dims) == [SIZE, SIZE, 3] and ins[INPUT_NAME].data_type == mc.TYPE_UINT8
    assert ins[EXPLAIN_TARGET].optional and ins[EXPLAIN_TARGET].data_type == mc.TYPE_INT32
    outs = {o.name: o for o in cfg.output}
    assert outs[OUTPUT_PROBABILITIES].label_filename == "labels.txt"
    assert list(outs[EXPLAIN_HEATMAP].dims) == [SIZE, SIZE]
    assert outs[EXPLAIN_OVERLAY_PNG].data_type == mc.TYPE_STRING
    assert outs[EXPLAIN_TARGET + "_USED"].data_type == mc.TYPE_INT32
    assert cfg.parameters["checkpoint_sha256"].string_value == file_sha256(random_ckpt)
    assert cfg.parameters["checkpoint"].string_value == "model.safetensors"
    assert cfg.HasField("dynamic_batching")


def test_gpu_onnx_trt_config(tmp_path, random_ckpt, hushem_dir):
    from tritonclient.grpc import model_config_pb2 as mc

    from morphocam.export.pbtxt import parse
    from morphocam.export.repository import write_repository

    cfg = fast_config(tmp_path, random_ckpt, hushem_dir, target="gpu-onnx-trt")
    write_repository(cfg)
    m = cfg.output / "morphocam_hushem"
    assert (m / "1" / "model.onnx").is_file() and not (m / "1" / "model.py").exists()
    # The GPU repository's explainer runs PyTorch on the GPU instance, with the same files as on CPU.
    e = cfg.output / "morphocam_hushem_explain"
    ec = parse(e / "config.pbtxt")
    assert ec.backend == "python" and [g.kind for g in ec.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert sorted(p.name for p in (e / "1").glob("*.py")) == ["explain_core.py", "model.py", "morphocam_net.py"]
    c = parse(m / "config.pbtxt")
    assert c.platform == "onnxruntime_onnx" and c.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    (acc,) = c.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert acc.parameters["trt_engine_cache_enable"] == "true"


def _has_tensorrt_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_tensorrt_gpu(), reason="TensorRT engine build needs the `tensorrt` package and a CUDA "
                                                    "GPU; neither is available here (path untested)")
def test_tensorrt_plan_build(tmp_path, random_ckpt, hushem_dir):
    from morphocam.export.repository import write_repository

    cfg = fast_config(tmp_path, random_ckpt, hushem_dir, target="tensorrt")
    write_repository(cfg)
    assert (cfg.output / "morphocam_hushem" / "1" / "model.plan").stat().st_size > 0


@pytest.mark.skipif(_has_tensorrt_gpu(), reason="TensorRT and a GPU are present")
def test_tensorrt_target_stops_clearly_without_gpu(tmp_path, random_ckpt, hushem_dir):
    from morphocam.export.repository import write_repository

    cfg = fast_config(tmp_path, random_ckpt, hushem_dir, target="tensorrt")
    with pytest.raises(ExportError, match="tensorrt|GPU"):
        write_repository(cfg)
    assert not cfg.output.exists()


# ------------------------------------------------------------------ bad checkpoints

def _truncated(tmp: Path, good: Path) -> Path:
    p = tmp / "bad" / "model.safetensors"
    p.parent.mkdir()
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return p


def _no_metadata(tmp: Path, good: Path) -> Path:
    from safetensors.torch import load_file, save_file

    p = tmp / "bad" / "model.safetensors"
    p.parent.mkdir()
    save_file(load_file(str(good)), str(p))
    return p


def _wrong_class_count(tmp: Path, good: Path) -> Path:
    # the metadata says hushem with 3 classes: not the hushem contract
    return make_checkpoint(tmp / "bad" / "model.safetensors", classes=CLASSES[:3])


def _head_mismatch(tmp: Path, good: Path) -> Path:
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from morphocam.training.checkpoint import file_sha256

    src = make_checkpoint(tmp / "src" / "model.safetensors", classes=("a", "b", "c"), dataset="other")
    with safe_open(str(src), framework="pt") as fh:
        meta = _json.loads(fh.metadata()["morphocam"])
    meta["contract"]["classes"] = ["a", "b", "c", "d"]  # 4 classes claimed, 3-way head
    p = tmp / "bad" / "model.safetensors"
    p.parent.mkdir()
    save_file(load_file(str(src)), str(p), metadata={"morphocam": _json.dumps(meta)})
    p.with_name(p.name + ".sha256").write_text(f"{file_sha256(p)}  model.safetensors\n")
    return p


def _sha_mismatch(tmp: Path, good: Path) -> Path:
    p = tmp / "bad" / "model.safetensors"
    p.parent.mkdir()
    p.write_bytes(good.read_bytes())
    p.with_name(p.name + ".sha256").write_text("0" * 64 + "  model.safetensors\n")
    return p


@pytest.mark.parametrize("make_bad,message", [
    (_truncated, "not a readable safetensors|cannot read weights"),
    (_no_metadata, "no morphocam metadata"),
    (_wrong_class_count, "do not match the hushem contract"),
    (_head_mismatch, "does not match the 4 classes"),
    (_sha_mismatch, "sha256"),
])
def test_bad_checkpoint_is_refused_and_nothing_written(tmp_path, random_ckpt, hushem_dir, make_bad, message, capsys):
    from morphocam.export.cli import main

    bad = make_bad(tmp_path, random_ckpt)
    out = tmp_path / "out" / "repo"
    # once with the good checkpoint first: its finished model must not be committed either
    ckpts = f"{random_ckpt},{bad}" if make_bad is _sha_mismatch else str(bad)
    rc = main(["--checkpoints", ckpts, "--output", str(out), "--exporter", "legacy",
               "--measure", "false", "--data-root", str(hushem_dir.parent), "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(bad) in err and __import__("re").search(message, err), err
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no staging folder left behind


def test_missing_serving_model_file_is_clear(tmp_path, random_ckpt, hushem_dir):
    from morphocam.export.repository import write_repository

    cfg = fast_config(tmp_path, random_ckpt, hushem_dir, serving_models_dir=tmp_path / "nowhere")
    with pytest.raises(ExportError, match="classifier.py is missing"):
        write_repository(cfg)
    assert not cfg.output.exists()


# ------------------------------------------------------------------ regeneration

def test_regenerating_gives_the_same_graph_outputs(tmp_path, cpu_repo, random_ckpt, hushem_dir, real_frames):
    from morphocam.export.engines import all_outputs_runner, run_named
    from morphocam.export.repository import write_repository

    out, _ = cpu_repo
    cfg = fast_config(tmp_path, random_ckpt, hushem_dir, explain=False, trust=True)
    write_repository(cfg)
    runs = []
    for repo in (out, cfg.output):  # the trust fit is a reproducible step: same checkpoint, same outputs
        runs.append(run_named(all_outputs_runner(repo / "morphocam_hushem" / "1" / "model.onnx", 1), real_frames))
    assert set(runs[0]) == {OUTPUT_LOGITS, OUTPUT_PROBABILITIES, OUTPUT_OOD_SCORE, OUTPUT_IN_DOMAIN, OUTPUT_PREDICTION_SET}
    for name, value in runs[0].items():
        np.testing.assert_allclose(value.astype(float), runs[1][name].astype(float), atol=1e-6, err_msg=name)
    cards = [json.loads((r / "morphocam_hushem" / "model_card.json").read_text())["trust"] for r in (out, cfg.output)]
    assert cards[0]["temperature"] == cards[1]["temperature"] and cards[0]["conformal"] == cards[1]["conformal"]


def test_committed_model_files_equal_their_sources(repo_root):
    """Every model.py (and engine factory) under model_repository/ is a copy of its one source: an edit
    to the source without re-exporting (or an edit to a copy) fails here."""
    from morphocam.engines import VERSION_FOLDER_NAME

    sources = {"": repo_root / "serving/triton_models/classifier.py",
               "_explain": repo_root / "serving/triton_models/explainer.py"}
    checked = 0
    for model_py in sorted((repo_root / "model_repository").glob("*/1/model.py")):
        name = model_py.parent.parent.name
        source = sources["_explain" if name.endswith("_explain") else ""]
        assert model_py.read_bytes() == source.read_bytes(), f"{model_py} differs from {source}: re-export"
        factory = model_py.with_name(VERSION_FOLDER_NAME)
        if source.name == "classifier.py":
            assert factory.read_bytes() == (repo_root / "morphocam/engines.py").read_bytes(), factory
        checked += 1
    if not checked:
        pytest.skip("no committed model_repository/")


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["hushem", "smids"])
def test_committed_repository_regenerates(tmp_path, repo_root, dataset, hushem_dir):
    """The committed model_repository/ must equal what its own checkpoint exports to (graph outputs)."""
    from morphocam.export.engines import reference_runner
    from morphocam.export.onnx_export import export_onnx
    from morphocam.preprocess import load_frame
    from morphocam.training.checkpoint import contract_of, load_checkpoint

    m = repo_root / "model_repository" / f"morphocam_{dataset}"
    ckpt = m.parent / f"morphocam_{dataset}_explain" / "1" / "model.safetensors"
    if not (m / "1" / "model.onnx").is_file() or not ckpt.is_file():
        pytest.skip(f"no committed {m.name} with its checkpoint in model_repository/")
    card = json.loads((m / "model_card.json").read_text())
    net, meta = load_checkpoint(ckpt)
    contract = contract_of(meta)
    assert card["checkpoint"]["sha256"] == (ckpt.with_name(ckpt.name + ".sha256").read_text().split()[0])
    exporter = "dynamo" if card["export"]["exporter"].startswith("dynamo") else "legacy"
    f = tmp_path / "model.onnx"
    export_onnx(net, contract, f, opset=card["export"]["opset"], exporter=exporter)
    root = Path(card["data"]["root"])
    if not root.is_absolute():
        root = repo_root / root
    files = [sorted((root / c).iterdir())[0] for c in contract.classes]
    frames = np.stack([load_frame(p, contract.height, contract.width) for p in files])
    a = reference_runner(m / "1" / "model.onnx", 1)(frames)
    b = reference_runner(f, 1)(frames)
    np.testing.assert_allclose(a[0], b[0], atol=1e-4)  # LOGITS: the checkpoint's network, unchanged
    # PROBABILITIES: the network's, at the temperature the card records (re-fitting takes minutes:
    # test_regenerating_gives_the_same_graph_outputs shows the fit itself is reproducible)
    t = (card.get("trust") or {}).get("temperature", {}).get("value", 1.0)
    from morphocam.export.trust_math import softmax

    np.testing.assert_allclose(a[1], softmax(b[0], t), atol=1e-5)


# ------------------------------------------------------------------ trust outputs

def test_card_records_the_trust_fit_and_its_data(cpu_repo):
    out, _ = cpu_repo
    card = json.loads((out / "morphocam_hushem" / "model_card.json").read_text())
    trust, par = card["trust"], card["export"]["parity"]
    sizes = trust["data"]["sizes"]
    assert sizes["val_a"] + sizes["val_b"] == 33 and sizes["train"] == 150 and sizes["test"] == 33
    assert f"({sizes['val_a']} images)" in trust["temperature"]["fitted_on"]
    assert f"({sizes['val_b']} images)" in trust["conformal"]["fitted_on"]
    assert trust["conformal"]["coverage"] == 0.9 and trust["ood"]["acceptance"] == 0.95
    assert set(trust["outputs"]) >= {OUTPUT_OOD_SCORE, OUTPUT_IN_DOMAIN, OUTPUT_PREDICTION_SET}
    # parity of the new outputs, with a blank and a noise frame among the parity frames
    assert par["max_rel_ood_score_diff"] <= 1e-4 and par["synthetic_frames"] == 2
    assert par["in_domain_mismatches"] == 0 and par["prediction_set_mismatches"] == 0


def test_trust_outputs_on_real_and_synthetic_frames(cpu_repo, real_frames):
    """Shapes and dtypes as the contract says; sets hold the top class; probabilities are softmax(LOGITS / T)."""
    from morphocam.export.engines import all_outputs_runner, run_named
    from morphocam.export.parity import synthetic_frames
    from morphocam.export.trust_math import softmax

    out, _ = cpu_repo
    m = out / "morphocam_hushem"
    t = json.loads((m / "model_card.json").read_text())["trust"]["temperature"]["value"]
    frames = np.concatenate([real_frames, synthetic_frames(InputContract.load(m / "1" / "contract.json"))])
    got = run_named(all_outputs_runner(m / "1" / "model.onnx", 1), frames)
    n = len(frames)
    assert got[OUTPUT_OOD_SCORE].shape == (n, 1) and got[OUTPUT_OOD_SCORE].dtype == np.float32
    assert got[OUTPUT_IN_DOMAIN].shape == (n, 1) and got[OUTPUT_IN_DOMAIN].dtype == np.bool_
    assert got[OUTPUT_PREDICTION_SET].shape == (n, 4) and got[OUTPUT_PREDICTION_SET].dtype == np.bool_
    np.testing.assert_array_equal(got[OUTPUT_IN_DOMAIN][:, 0], got[OUTPUT_OOD_SCORE][:, 0] <= 1.0)
    top = got[OUTPUT_PROBABILITIES].argmax(1)
    assert got[OUTPUT_PREDICTION_SET][np.arange(n), top].all()
    np.testing.assert_allclose(got[OUTPUT_PROBABILITIES], softmax(got[OUTPUT_LOGITS], t), atol=1e-5)


@pytest.mark.parametrize("stage", [None, 6], ids=["final-features", "final+stage6"])
def test_trust_parity_failure_is_reported(tmp_path, random_ckpt, real_frames, hushem_dir, stage):
    """The graph reproduces the reference OOD score (with and without the backbone-stage distance), and a
    graph whose OOD statistics differ from the fitted ones is refused by the parity check."""
    import copy

    from morphocam.export.onnx_export import export_onnx
    from morphocam.export.parity import check_parity
    from morphocam.export.trust_fit import SplitFeatures, fit_from_features, pooled_features
    from morphocam.training.checkpoint import contract_of, load_checkpoint

    net, meta = load_checkpoint(random_ckpt)
    contract = contract_of(meta)
    f, lo, st = pooled_features(net, real_frames, contract, stage=stage)
    # a well-conditioned stand-in fit: 40 jittered copies of the 5 frames' features
    rng = np.random.default_rng(0)
    jitter = lambda a: np.concatenate([a + rng.normal(0, a.std(), a.shape) for _ in range(40)])  # noqa: E731
    labels = np.tile(np.arange(len(real_frames)) % 4, 40)
    part = SplitFeatures(jitter(f), np.tile(lo, (40, 1)), labels, stage=None if st is None else jitter(st))
    params = fit_from_features({"train": part, "val_a": part, "val_b": part}, 4, stage=stage)
    onnx_file = tmp_path / "model.onnx"
    export_onnx(net, contract, onnx_file, exporter="legacy", trust=params)
    assert check_parity(net, onnx_file, real_frames, contract, 1e-4, trust=params)["in_domain_mismatches"] == 0
    other = copy.deepcopy(params)
    if stage is None:
        other.ood_threshold *= 2
    else:  # only the stage's part differs: the graph must be computing it
        other.ood_stage_scale *= 0.25
    with pytest.raises(ExportError, match="OOD_SCORE"):
        check_parity(net, onnx_file, real_frames, contract, 1e-4, trust=other)


def test_checkpoint_without_recipe_cannot_fit_trust(tmp_path, hushem_dir):
    from morphocam.export.repository import write_repository
    from morphocam.training.checkpoint import read_metadata, save_checkpoint
    from morphocam.training.model import build_model

    ckpt = tmp_path / "bare" / "model.safetensors"
    make_checkpoint(ckpt)
    meta = {k: v for k, v in read_metadata(ckpt).items() if k != "recipe"}
    save_checkpoint(build_model("tf_efficientnet_lite0", 4).eval(), meta, ckpt)
    with pytest.raises(ExportError, match="--trust false"):
        write_repository(fast_config(tmp_path, ckpt, hushem_dir, trust=True))


# ------------------------------------------------------------------ INT8

def _m(precision: str, speed: float, accuracy: float):
    from morphocam.export.engines import Measurement

    return Measurement("onnxruntime", precision, "m.onnx", speed, accuracy, accuracy, 1.0, 0.0, 100)


@pytest.mark.parametrize("int8_speed,int8_accuracy,kept,reason", [
    (200.0, 0.795, True, "kept"),                        # 2x faster, 0.5 points lost: within the 1-point bound
    (200.0, 0.780, False, "too much accuracy lost"),     # 2 points lost
    (104.0, 0.800, False, "not faster"),                 # inside the speed margin: noise, not a speed-up
    (90.0, 0.700, False, "not faster, too much accuracy lost"),
])
def test_int8_release_rule(int8_speed, int8_accuracy, kept, reason):
    """The exporter's own INT8 rule (export.repository.int8_decision) on both sides of each bound."""
    from morphocam.export.repository import int8_decision

    cfg = ExportConfig()
    ms = [_m("fp32", 100.0, 0.800), _m("fp32", 110.0, 0.800), _m("int8", int8_speed, int8_accuracy)]
    got, why = int8_decision(ms, cfg.speed_margin, cfg.int8_max_drop)
    assert got is kept and why.endswith(reason if kept else f"not kept ({reason})"), why


def test_int8_accuracy_on_real_test_split(tmp_path, repo_root, hushem_dir):
    """Static INT8 (ORT QDQ, MinMax) calibrated on real non-test images, on the released HuSHem test split.

    Recorded 2026-11-25 (export log / model card): FP32 0.818, INT8 0.606 (ORT) / 0.576 (OpenVINO),
    agreement 0.73 / 0.67, so the exporter does NOT keep INT8 (rule: <= 1 point). This test guards the
    recorded bound (drop <= 30 points, agreement >= 0.6) and that the exporter's rule rejects it.
    """
    from morphocam.export import data as D
    from morphocam.export.engines import make_runner, measure
    from morphocam.export.onnx_export import export_onnx
    from morphocam.export.quantize import quantize_int8
    from morphocam.export.repository import int8_decision
    from morphocam.training.checkpoint import contract_of, load_checkpoint

    ckpt = repo_root / "results" / "training" / "hushem" / "model.safetensors"
    if not ckpt.is_file():
        pytest.skip(f"released HuSHem checkpoint {ckpt} not trained yet")
    net, meta = load_checkpoint(ckpt)
    c = contract_of(meta)
    test = D.load_test_split(ckpt)
    x = D.load_images(hushem_dir, test.paths, c)
    f32, i8 = tmp_path / "m.onnx", tmp_path / "m8.onnx"
    export_onnx(net, c, f32, exporter="legacy")
    cal, _ = D.calibration_images(hushem_dir, c, test, 32)
    quantize_int8(f32, i8, cal)
    m32, p32 = measure(make_runner("onnxruntime", f32, "fp32"), f32.name, x, test.labels, None, c.num_classes,
                       seconds=0.5)
    m8, _ = measure(make_runner("onnxruntime", i8, "int8"), i8.name, x, test.labels, p32, c.num_classes, seconds=0.5)
    assert m32.accuracy - m8.accuracy <= 0.30, (m32.accuracy, m8.accuracy)
    assert m8.agreement_with_fp32 >= 0.6
    cfg = ExportConfig()
    kept, why = int8_decision([m32, m8], cfg.speed_margin, cfg.int8_max_drop)
    assert not kept and "too much accuracy lost" in why, why


def test_ensemble_graph_serves_the_members_averaged_probabilities(tmp_path, real_frames):
    """Members that disagree confidently: the graph must average their probabilities (not their
    logits), on every frame, at any batch size."""
    import onnxruntime as ort
    import torch
    from PIL import Image

    from morphocam.export.ensemble import EnsembleNet
    from morphocam.export.onnx_export import export_onnx
    from morphocam.training.model import build_model

    contract = InputContract(classes=CLASSES, height=64, width=64, dataset="hushem")
    members = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        net = build_model("simplecnn", len(CLASSES)).eval()
        with torch.no_grad():
            net.head.weight.mul_(200.0)  # confident, and different per member
        members.append(net)
    frames = np.stack([np.asarray(Image.fromarray(f).resize((64, 64))) for f in real_frames[:6]])
    x = torch.from_numpy(((frames / 255.0 - np.array(contract.mean)) / np.array(contract.std)).astype(np.float32))
    x = x.permute(0, 3, 1, 2)
    with torch.no_grad():
        want = torch.stack([torch.softmax(m(x), -1) for m in members]).mean(0).numpy()
    path = tmp_path / "ensemble.onnx"
    export_onnx(EnsembleNet(members), contract, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = sess.run([OUTPUT_PROBABILITIES], {INPUT_NAME: frames})[0]
    single = np.concatenate([sess.run([OUTPUT_PROBABILITIES], {INPUT_NAME: f[None]})[0] for f in frames])
    assert np.abs(probs - want).max() < 1e-4 and np.abs(single - want).max() < 1e-4
    assert (probs.max(1) < 0.999).any()  # the members disagree somewhere, so averaging is being tested
