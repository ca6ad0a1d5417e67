"""Settings of the serving benchmark (``morphocam-bench serving``), one typed dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from morphocam.config import option
from morphocam.engines import EngineSettings


@dataclass
class ServingBenchConfig:
    model_repository: Path = option("Triton model repository", Path("model_repository"))
    model: str = option("classifier model name", "morphocam_hushem")
    images: Path = option("folder of real images to send", Path("samples"))
    output_dir: Path = option("results folder", Path("results/benchmarks/serving"))
    batches: tuple[int, ...] = option("in-process batch sizes", (1, 8, 32))
    concurrency: tuple[int, ...] = option("requests in flight", (1, 4, 16, 64))
    request_batches: tuple[int, ...] = option("frames per request for the served runs", (1, 8))
    seconds: float = option("seconds per served measurement", 8.0)
    inprocess_seconds: float = option("seconds per in-process measurement", 4.0)
    # The in-process ceiling is built by the same engine factory as the served model; its defaults are
    # the served settings, so the served/ceiling ratio compares like with like.
    inprocess_threads: int = option("in-process engine threads (0 = the cores this process may use)", 0)
    inprocess_spinning: bool = option("let in-process ONNX Runtime threads spin between ops", False)
    inprocess_execution_mode: str = option("in-process ONNX Runtime execution mode (sequential | parallel)",
                                           "sequential")
    explain: bool = option("also time the explanation model at batch 1 and 8", True)
    shared_memory: bool = option("also send the frames through Triton's system shared memory", True)
    perf_analyzer: Optional[Path] = option("perf_analyzer binary for a comparison run "
                                           "(default: $MORPHOCAM_PERF_ANALYZER or PATH; skipped if absent)", None)
    streaming: bool = option("also time the CASA streaming client (clients.streaming) end to end", True)
    stream_frames: int = option("frames the streaming client sends", 3000)
    # serve the released model under other settings (None = as in the repository's config.pbtxt)
    engine: Optional[str] = option("override the classifier engine (onnxruntime | openvino)", None)
    precision: Optional[str] = option("override the engine precision (fp32 | bf16)", None)
    instances: Optional[int] = option("override the instance count", None)
    threads: Optional[int] = option("override engine threads per instance", None)
    queue_delay_us: Optional[int] = option("override the dynamic-batching queue delay (microseconds)", None)
    queue_policy: Optional[bool] = option("false: serve without max_queue_size/timeout (Triton's prefetching "
                                          "batcher); default: as in the config", None)
    classifier_engines: tuple[str, ...] = option(
        "classifier engines served one after the other in this run, each on its own server: native (Triton's "
        "ONNX Runtime backend) | python-ort | openvino (Python backend); ignored with --engine", ("native", "python-ort"))

    def variant(self, classifier_engine: Optional[str] = None):
        from .variants import ServingVariant

        return ServingVariant(self.engine, self.precision, self.instances, self.threads, self.queue_delay_us,
                              classifier_engine=classifier_engine, queue_policy=self.queue_policy)

    def inprocess_settings(self) -> EngineSettings:
        """The engine settings of the in-process ceiling (engine and precision are filled per engine)."""
        return EngineSettings(threads=self.inprocess_threads, spinning=self.inprocess_spinning,
                              execution_mode=self.inprocess_execution_mode)
