"""``ExportConfig``: every option of ``morphocam-export`` (flags built by :func:`morphocam.config.parse_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from morphocam.config import option

TARGETS = ("cpu", "gpu-onnx-trt", "tensorrt")
ENGINES = ("auto", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
EXPORTERS = ("dynamo", "legacy")

PROJECT_ROOT = Path(__file__).resolve().parents[1]




@dataclass
class ExportConfig:
    checkpoints: list[Path] = option("comma-separated checkpoint files (model.safetensors), one model per dataset", [])
    output: Path = option("model repository folder to write (model folders are replaced whole)", Path("model_repository"))
    target: str = option(f"deployment target: {' | '.join(TARGETS)}", "cpu")
    data_root: Optional[Path] = option("folder holding <dataset>/<class>/images; default: the checkpoint recipe's "
                                   "data_dir, then $MORPHOCAM_DATA/<dataset>, then ../shared/datasets/<dataset>", None)
    # Triton scheduling
    max_batch_size: int = option("max_batch_size of the classifier", 32)
    queue_delay_us: int = option("dynamic batching max_queue_delay_microseconds", 2000)
    max_queue_size: int = option("dynamic batching queue length before requests are rejected", 256)
    queue_timeout_us: int = option("default_timeout_microseconds of a queued request (0 = none)", 5_000_000)
    # Two instances: with one, Triton 2.51's dynamic batcher now and then leaves a queued batch waiting
    # its 500 ms idle timeout (traced: QUEUE_START -> COMPUTE_START = 500 ms with the instance idle;
    # ~2% of requests at 4-16 in flight); with two, no such stall in 80 s of traced load.
    instances: int = option("instance_group count of the classifier", 2)
    threads: int = option("engine intra-op threads per instance written to the configs (0: the Python-backend "
                          "configs use all cores, time-shared by the instances; the native ONNX Runtime config "
                          "gets this machine's cores / instances, written explicitly)", 0)
    explain: bool = option("also write the <model>_explain Grad-CAM++ model", True)
    explain_max_batch_size: int = option("max_batch_size of the explain model", 8)
    explain_queue_delay_us: int = option("dynamic batching delay of the explain model", 5000)
    # graph
    opset: int = option("ONNX opset", 18)
    exporter: str = option(f"torch.onnx exporter: {' | '.join(EXPORTERS)} (dynamo gives the cleaner graph)", "dynamo")
    parity_tolerance: float = option("fail if max |Δprobability| ONNX Runtime vs PyTorch exceeds this", 1e-4)
    parity_images: int = option("real images used for the parity check", 16)
    # trust outputs (export/trust_fit.py): fitted from the checkpoint's own recorded split
    trust: bool = option("fold temperature, OOD_SCORE/IN_DOMAIN and the conformal PREDICTION_SET into the graph "
                         "(fitted on the checkpoint's re-derived split; needs its dataset)", True)
    coverage: float = option("conformal prediction-set coverage (1 - alpha)", 0.9)
    ood_acceptance: float = option("share of in-domain validation frames IN_DOMAIN must accept (sets the OOD threshold)",
                                   0.95)
    ood_stage: int = option("backbone stage whose pooled activations get a second OOD distance beside the final "
                            "features' (acquisition shift: other microscope, stain, resolution); -1 = final features "
                            "only; ignored for backbones without stages (simplecnn); 6 = the last stage of "
                            "EfficientNet-Lite0/B0 (stage choice: README, Trust)", 6)
    # engine / precision choice (cpu target)
    engine: str = option(f"CPU engine: {' | '.join(ENGINES)} (auto = fastest within the accuracy bound)", "auto")
    precision: str = option(f"CPU precision: {' | '.join(PRECISIONS)}", "auto")
    measure: bool = option("measure engines (speed + test-split accuracy); off: onnxruntime fp32 unless forced", True)
    reuse_measurements: bool = option("with --measure false, keep the engine measurements of the model card "
                                      "already in --output (marked as reused)", True)
    release_max_drop: float = option("a reduced-precision variant is released only within this many accuracy points", 0.5)
    int8: bool = option("try static INT8 (ONNX Runtime QDQ) calibrated on real training images", True)
    int8_max_drop: float = option("INT8 is kept only if faster and within this many accuracy points", 1.0)
    calibration_dir: Optional[Path] = option("folder of calibration images (default: the checkpoint's non-test images)", None)
    calibration_size: int = option("calibration images for INT8", 96)
    eval_limit: Optional[int] = option("use at most this many test-split images for engine accuracy (None = all)", None)
    speed_margin: float = option("a variant counts as faster only if it beats the other by this fraction (noise guard)", 0.05)
    bench_batch: int = option("batch size of the in-process speed measurement", 8)
    bench_seconds: float = option("seconds per engine speed measurement", 3.0)
    bench_threads: int = option("threads for the in-process measurements (0 = all cores)", 0)
    serving_models_dir: Path = option("where serving keeps the model folders' code (classifier.py, explainer.py, "
                                      "explain_core.py, morphocam_net.py)",
                                  PROJECT_ROOT / "serving" / "triton_models")
    progress: bool = option("print a line per step", True)

    def __post_init__(self) -> None:
        if isinstance(self.checkpoints, (str, Path)):
            self.checkpoints = [Path(self.checkpoints)]
        self.checkpoints = [Path(p) for p in self.checkpoints]
        checks = [
            (self.target in TARGETS, f"target must be one of {TARGETS}, got {self.target!r}"),
            (self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.exporter in EXPORTERS, f"exporter must be one of {EXPORTERS}, got {self.exporter!r}"),
            (self.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (self.instances >= 1, "instances must be >= 1"),
            (self.queue_delay_us >= 0 and self.max_queue_size >= 0 and self.queue_timeout_us >= 0,
             "queue settings must be >= 0"),
            (self.parity_tolerance > 0, "parity_tolerance must be > 0"),
            (self.parity_images >= 1, "parity_images must be >= 1"),
            (0 < self.coverage < 1, "coverage must be in (0, 1)"),
            (0 < self.ood_acceptance <= 1, "ood_acceptance must be in (0, 1]"),
            (self.bench_batch >= 1, "bench_batch must be >= 1"),
            (not (self.engine == "onnxruntime" and self.precision == "bf16"),
             "bf16 is an OpenVINO precision: use --engine openvino or auto"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
