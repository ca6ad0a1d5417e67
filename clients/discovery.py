"""Model discovery: input size, batch limit and class names, asked of the serving model itself."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from morphocam.contract import DATASET_CLASSES, INPUT_DTYPE, INPUT_NAME, OUTPUT_PROBABILITIES, dataset_for_model

from morphocam.clients.errors import ServerUnavailable, is_transient, status_of
from morphocam.clients.server_pool import ServerPool


@dataclass
class ModelInfo:
    """What a client learns about a served model: input size, class order, batch limit, version."""

    name: str
    height: int
    width: int
    classes: tuple[str, ...]
    max_batch_size: int = 32
    version: str = ""


def _dims(values) -> list[int]:
    return [int(v) for v in values]


def parse_classification(entries: np.ndarray, num_classes: int) -> tuple[str, ...] | None:
    """Class names from Triton's classification output (``score:index:label`` bytes per class)."""
    names: dict[int, str] = {}
    for raw in np.asarray(entries).reshape(-1):
        text = raw.decode("utf-8") if isinstance(raw, (bytes, np.bytes_)) else str(raw)
        parts = text.split(":", 2)
        if len(parts) == 3 and parts[1].lstrip("-").isdigit():
            names[int(parts[1])] = parts[2]
    if len(names) != num_classes or sorted(names) != list(range(num_classes)) or not all(names.values()):
        return None
    return tuple(names[i] for i in range(num_classes))


def discover_model(pool: ServerPool, model: str, version: str = "", deadline_s: float = 60.0,
                   timeout_s: float = 10.0) -> ModelInfo:
    """Input size, batch limit and class names from the first server that answers."""
    import tritonclient.grpc as grpcclient

    end = time.monotonic() + deadline_s
    last: BaseException | None = None
    attempt = 0
    while True:
        for ep in pool.endpoints:
            try:
                cfg = ep.client.get_model_config(model, model_version=version, as_json=True,
                                                 client_timeout=timeout_s)["config"]
                inp = next(i for i in cfg["input"] if i["name"] == INPUT_NAME)
                dims = _dims(inp["dims"])
                if len(dims) != 3 or dims[2] != 3:
                    raise ValueError(f"{model}: input {INPUT_NAME} has dims {dims}, expected [H, W, 3]")
                out = next(o for o in cfg["output"] if o["name"] == OUTPUT_PROBABILITIES)
                k = _dims(out["dims"])[-1]
                height, width = dims[0], dims[1]
                # Class names: the classification extension reads them from the model's label file.
                probe = grpcclient.InferInput(INPUT_NAME, [1, height, width, 3], INPUT_DTYPE)
                probe.set_data_from_numpy(np.zeros((1, height, width, 3), np.uint8))
                res = ep.client.infer(model, [probe], model_version=version,
                                      outputs=[grpcclient.InferRequestedOutput(OUTPUT_PROBABILITIES, class_count=k)],
                                      client_timeout=timeout_s)
                classes = parse_classification(res.as_numpy(OUTPUT_PROBABILITIES), k)
                if classes is None:
                    classes = DATASET_CLASSES.get(dataset_for_model(model)) or tuple(f"class_{i}" for i in range(k))
                return ModelInfo(name=model, height=height, width=width, classes=tuple(classes),
                                 max_batch_size=int(cfg.get("max_batch_size", 0)) or 1,
                                 version=str(res.get_response().model_version))
            except (KeyboardInterrupt, SystemExit):
                raise
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001
                message = str(exc).lower()
                if not is_transient(exc) or "unknown model" in message or status_of(exc) == "NOT_FOUND":
                    raise RuntimeError(f"{ep.url}: cannot use model {model!r}: {exc}") from None
                last = exc
                pool.mark_down(ep, exc)
        if time.monotonic() >= end:
            raise ServerUnavailable(f"no server at {[e.url for e in pool.endpoints]} serves {model!r} "
                                    f"within {deadline_s:.0f} s (last error: {last})")
        attempt += 1
        time.sleep(min(2.0, 0.1 * 2 ** attempt))
