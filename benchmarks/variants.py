"""Serve a classifier with different scheduling/engine settings without touching the released repository.

A variant is the released model folder copied into a scratch repository with its ``config.pbtxt``
fields overridden (which of the folder's configs is served — Triton's ONNX Runtime backend or a
Python-backend ``configs/<engine>.pbtxt`` —, engine, precision, instance count, threads per instance,
dynamic-batching queue delay and queue policy, preferred batch sizes). The explanation model, if present, is linked unchanged. The graph
file and its sha256 sidecar are the released ones, so the served numbers are those of the
released model under another configuration.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from morphocam.contract import NATIVE_ENGINE, PYTHON_ENGINES, explain_model_for

# Python-backend engine -> the alternative config that runs it
PYTHON_CONFIG_OF_ENGINE = {"onnxruntime": "python-ort", "openvino": "openvino"}


@dataclass(frozen=True)
class ServingVariant:
    engine: Optional[str] = None          # onnxruntime | openvino (Python-backend configs)
    precision: Optional[str] = None       # fp32 | bf16 (OpenVINO)
    instances: Optional[int] = None       # instance_group count
    threads: Optional[int] = None         # engine threads per instance (0 = the model.py default)
    queue_delay_us: Optional[int] = None  # dynamic_batching max_queue_delay_microseconds
    preferred_batch_sizes: Optional[tuple[int, ...]] = None
    classifier_engine: Optional[str] = None  # native | python-ort | openvino: which config of the folder
    queue_policy: Optional[bool] = None   # False: no max_queue_size / timeout (Triton's prefetching batcher)

    def is_default(self) -> bool:
        return all(v is None for v in asdict(self).values())

    def config_name(self) -> str:
        """The folder's config this variant starts from (``engine`` alone implies its Python config)."""
        if self.classifier_engine is not None:
            return self.classifier_engine
        return PYTHON_CONFIG_OF_ENGINE.get(self.engine, NATIVE_ENGINE) if self.engine else NATIVE_ENGINE

    def label(self) -> str:
        parts = [self.classifier_engine if self.classifier_engine and not self.engine else "",
                 f"{self.engine or '?'}/{self.precision or '?'}" if (self.engine or self.precision) else "",
                 f"{self.instances}x{self.threads}" if self.instances is not None or self.threads is not None else "",
                 f"delay {self.queue_delay_us} us" if self.queue_delay_us is not None else "",
                 f"preferred {list(self.preferred_batch_sizes)}" if self.preferred_batch_sizes else "",
                 "" if self.queue_policy is None else ("queue policy" if self.queue_policy else "no queue policy")]
        return ", ".join(p for p in parts if p) or "as released"


def describe(config_path: Path) -> dict:
    """The scheduling/engine facts of a classifier ``config.pbtxt`` (what a variant can change)."""
    from morphocam.export import pbtxt

    cfg = pbtxt.parse(Path(config_path))
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    native = cfg.platform == "onnxruntime_onnx"
    return {"classifier_engine": NATIVE_ENGINE if native else PYTHON_CONFIG_OF_ENGINE.get(params.get("engine")),
            "engine": "onnxruntime (Triton backend)" if native else params.get("engine"),
            "precision": "fp32" if native else params.get("precision"),
            "instances": sum(g.count or 1 for g in cfg.instance_group) or 1,
            "threads": int(params.get("intra_op_thread_count" if native else "threads") or 0),
            "queue_policy": cfg.dynamic_batching.HasField("default_queue_policy"),
            "queue_delay_us": cfg.dynamic_batching.max_queue_delay_microseconds,
            "preferred_batch_sizes": list(cfg.dynamic_batching.preferred_batch_size),
            "max_batch_size": cfg.max_batch_size}


def write_variant(repository: Path, model: str, variant: ServingVariant, scratch: Path) -> Path:
    """A repository under ``scratch`` serving ``model`` (and its explain model) with ``variant`` applied."""
    from morphocam.export import pbtxt

    repository, scratch = Path(repository).resolve(), Path(scratch)
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    src = repository / model
    if not (src / "config.pbtxt").is_file():
        raise FileNotFoundError(f"no model {model!r} in {repository}")
    dst = scratch / model
    shutil.copytree(src, dst)
    name = variant.config_name()
    source = dst / "config.pbtxt" if name == NATIVE_ENGINE else dst / pbtxt.CONFIGS_DIR / f"{name}.pbtxt"
    if name not in (NATIVE_ENGINE, *PYTHON_ENGINES) or not source.is_file():
        raise FileNotFoundError(f"{model} has no config for classifier engine {name!r} ({source})")
    cfg = pbtxt.parse(source)
    native = cfg.platform == "onnxruntime_onnx"
    if native and (variant.engine or variant.precision):
        raise ValueError("engine/precision overrides apply to the Python-backend configs (python-ort | openvino)")
    if variant.engine is not None:
        cfg.parameters["engine"].string_value = variant.engine
    if variant.precision is not None:
        cfg.parameters["precision"].string_value = variant.precision
    if variant.threads is not None:
        cfg.parameters["intra_op_thread_count" if native else "threads"].string_value = str(variant.threads)
    if variant.queue_policy is False:
        cfg.dynamic_batching.ClearField("default_queue_policy")
    if variant.instances is not None:
        del cfg.instance_group[1:]
        group = cfg.instance_group[0] if cfg.instance_group else cfg.instance_group.add()
        group.count = variant.instances
    if variant.queue_delay_us is not None:
        cfg.dynamic_batching.max_queue_delay_microseconds = variant.queue_delay_us
    if variant.preferred_batch_sizes is not None:
        cfg.dynamic_batching.preferred_batch_size[:] = list(variant.preferred_batch_sizes)
    (dst / "config.pbtxt").write_text(pbtxt.to_text(cfg))
    explain = repository / explain_model_for(model)
    if explain.is_dir():
        (scratch / explain.name).symlink_to(explain, target_is_directory=True)
    return scratch
