"""``morphocam-explain``: Grad-CAM++ explanations for chosen frames, from the explanation service.

    morphocam-explain --url 127.0.0.1:8001 --model morphocam_hushem --output-dir out/explain \\
        (--from-results results.jsonl [--least-confident N | --ids ID ...] | PATH ...)

For every frame: ``<n>_<name>_overlay.png`` (the server's heatmap over the frame),
``<n>_<name>_heatmap.npy`` (raw float32 heatmap in [0, 1], model input size), and one
``contact_sheet.png`` (frame, overlay, class and probability per row) plus ``explanations.jsonl``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from morphocam import plotting
from morphocam.atomic import atomic_write_bytes, atomic_write_text
from morphocam.config import build_parser, config_from_args, option
from morphocam.contract import (DATASET_CLASSES, EXPLAIN_HEATMAP, EXPLAIN_OVERLAY_PNG, EXPLAIN_SUFFIX, EXPLAIN_TARGET,
                                INPUT_DTYPE, INPUT_NAME, OUTPUT_PROBABILITIES, dataset_for_model, explain_model_for)
from morphocam.preprocess import ImageDecodeError, load_frame

from morphocam.clients.results_io import read_records
from morphocam.clients.sources import reload_frame
from morphocam.clients.channel import make_grpc_client
from morphocam.clients.discovery import discover_model
from morphocam.clients.errors import is_transient, status_of
from morphocam.clients.options import ConnectionOptions
from morphocam.clients.server_pool import ServerPool

TARGET_USED = "TARGET_CLASS_USED"


@dataclass
class Explanation:
    frame_id: str
    predicted_class: str
    probability: float
    target_class: str
    frame: np.ndarray
    heatmap: np.ndarray
    overlay_png: bytes
    overlay_path: Path | None = None
    heatmap_path: Path | None = None


def select_from_results(records: list[dict], least_confident: int | None = None,
                        ids: Sequence[str] | None = None) -> list[str]:
    ok = [r for r in records if r.get("status", "ok") == "ok"]
    if ids:
        known = {r["frame_id"] for r in records}
        missing = [i for i in ids if i not in known]
        if missing:
            raise ValueError(f"ids not in the results file: {missing[:5]}")
        return list(ids)
    n = least_confident or 3
    ranked = sorted(ok, key=lambda r: (float(r.get("confidence", max((r.get("probabilities") or {0: 1}).values()))),
                                       r["frame_id"]))
    return [r["frame_id"] for r in ranked[:n]]


def _safe(frame_id: str, index: int) -> str:
    tail = re.sub(r"[^A-Za-z0-9._=-]+", "_", frame_id.replace("#", "_"))[-60:].strip("._")
    return f"{index:03d}_{tail or 'frame'}"


def explain_frames(frame_ids: Sequence[str], urls: Sequence[str], model: str, output_dir: Path,
                   target_class: int = -1, timeout_s: float = 60.0, retry_deadline_s: float = 60.0,
                   ssl: bool = False, root_certificates: str | None = None, payloads: Sequence | None = None
                   ) -> list[Explanation]:
    """Ask ``<model>_explain`` about each frame; save overlays, heatmaps and a contact sheet."""
    import tritonclient.grpc as grpcclient

    base = model.removesuffix(EXPLAIN_SUFFIX)
    explain_model = explain_model_for(model)
    pool = ServerPool(urls, lambda u: make_grpc_client(u, ssl, root_certificates))
    try:
        info = discover_model(pool, base, deadline_s=retry_deadline_s, timeout_s=timeout_s)
        cfg = None
        for ep in pool.endpoints:
            try:
                cfg = ep.client.get_model_config(explain_model, as_json=True, client_timeout=timeout_s)["config"]
                break
            except Exception as exc:  # noqa: BLE001
                last = exc
        if cfg is None:
            raise RuntimeError(f"no server serves {explain_model!r}: {last}")
        max_batch = max(1, int(cfg.get("max_batch_size", 1)))
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        frames: list[tuple[str, np.ndarray]] = []
        for i, fid in enumerate(frame_ids):
            source = payloads[i] if payloads is not None else reload_frame(fid)
            try:
                frames.append((fid, load_frame(source, info.height, info.width, fid)))
            except (ImageDecodeError, ValueError) as exc:
                print(f"morphocam-explain: skipping {fid}: {exc}", file=sys.stderr)
        results: list[Explanation] = []
        for start in range(0, len(frames), max_batch):
            chunk = frames[start:start + max_batch]
            pixels = np.stack([p for _, p in chunk])
            inputs = [grpcclient.InferInput(INPUT_NAME, list(pixels.shape), INPUT_DTYPE),
                      grpcclient.InferInput(EXPLAIN_TARGET, [len(chunk), 1], "INT32")]
            inputs[0].set_data_from_numpy(pixels)
            inputs[1].set_data_from_numpy(np.full((len(chunk), 1), target_class, np.int32))
            outputs = [grpcclient.InferRequestedOutput(n) for n in
                       (OUTPUT_PROBABILITIES, EXPLAIN_HEATMAP, EXPLAIN_OVERLAY_PNG, TARGET_USED)]
            res = _infer_with_retry(pool, explain_model, inputs, outputs, timeout_s, retry_deadline_s)
            probs = res.as_numpy(OUTPUT_PROBABILITIES)
            heat = res.as_numpy(EXPLAIN_HEATMAP).astype(np.float32)
            pngs = res.as_numpy(EXPLAIN_OVERLAY_PNG).reshape(len(chunk), -1)[:, 0]
            used = res.as_numpy(TARGET_USED).reshape(-1)
            for j, (fid, px) in enumerate(chunk):
                k = int(np.argmax(probs[j]))
                t = int(used[j])
                ex = Explanation(fid, info.classes[k], float(probs[j][k]),
                                 info.classes[t] if 0 <= t < len(info.classes) else str(t), px, heat[j],
                                 bytes(pngs[j]))
                name = _safe(fid, start + j)
                ex.overlay_path = output_dir / f"{name}_overlay.png"
                ex.heatmap_path = output_dir / f"{name}_heatmap.npy"
                atomic_write_bytes(ex.overlay_path, ex.overlay_png)
                atomic_write_bytes(ex.heatmap_path, npy_bytes(ex.heatmap))
                results.append(ex)
        if results:
            atomic_write_bytes(output_dir / "contact_sheet.png", contact_sheet_png(results, model=base))
            index = "".join(json.dumps({"frame_id": e.frame_id, "predicted_class": e.predicted_class,
                                        "probability": round(e.probability, 6), "target_class": e.target_class,
                                        "overlay": e.overlay_path.name, "heatmap": e.heatmap_path.name}) + "\n"
                            for e in results)
            atomic_write_text(output_dir / "explanations.jsonl", index)
        return results
    finally:
        pool.close()


def npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _infer_with_retry(pool: ServerPool, model: str, inputs, outputs, timeout_s: float, deadline_s: float):
    end = time.monotonic() + deadline_s
    while True:
        ep = pool.pick()
        if ep is None:
            time.sleep(max(0.05, pool.wait_time()))
            continue
        try:
            res = ep.client.infer(model, inputs, outputs=outputs, client_timeout=timeout_s)
            pool.release(ep)
            pool.mark_ok(ep)
            return res
        except Exception as exc:  # noqa: BLE001
            pool.release(ep)
            if not is_transient(exc) or time.monotonic() > end:
                raise RuntimeError(f"{ep.url}: {model}: {status_of(exc) or type(exc).__name__}: {exc}") from None
            pool.mark_down(ep, exc)


def contact_sheet_png(explanations: Sequence[Explanation], model: str = "") -> bytes:
    import io

    from PIL import Image

    n = len(explanations)
    fig, axes = plotting.subplots(n, 2, figsize=(5.2, 2.6 * n + 0.4), dpi=90, squeeze=False)
    for row, ex in zip(axes, explanations):
        row[0].imshow(ex.frame)
        try:
            overlay = np.asarray(Image.open(io.BytesIO(ex.overlay_png)).convert("RGB"))
        except Exception:  # noqa: BLE001 - fall back to drawing the raw heatmap
            overlay = ex.heatmap
        row[1].imshow(overlay, cmap="jet" if overlay.ndim == 2 else None)
        title = ex.frame_id if len(ex.frame_id) <= 40 else "…" + ex.frame_id[-39:]
        row[0].set_title(title, fontsize=7)
        row[1].set_title(f"{ex.predicted_class} p={ex.probability:.2f}"
                         + (f"\n(map for {ex.target_class})" if ex.target_class != ex.predicted_class else ""),
                         fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.suptitle(f"Grad-CAM++ {model}: decision aid, not a diagnosis", fontsize=9)
    return plotting.png_bytes(fig)


@dataclass
class ExplainConfig(ConnectionOptions):
    """Every option of ``morphocam-explain``."""

    paths: tuple[str, ...] = option("image files to explain (instead of --from-results)", (), positional=True,
                                    nargs="*", metavar="PATH")
    model: Optional[str] = option("classifier model name (default: the one named in the results file)", None)
    from_results: Optional[Path] = option("results file from morphocam-classify", None)
    least_confident: Optional[int] = option("explain the N least confident frames (default: 3)", None)
    ids: Optional[tuple[str, ...]] = option("frame ids from the results file", None, nargs="+", metavar="ID")
    target_class: str = option("class name or index to explain (-1: the predicted class)", "-1")
    output_dir: Optional[Path] = option("where overlays, heatmaps and the contact sheet go", None, required=True)
    timeout_s: float = option("per-request timeout, seconds", 60.0, flag="--timeout")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_certificates()
        if bool(self.paths) == bool(self.from_results):
            raise ValueError("give either PATHS or --from-results")
        if (self.least_confident or self.ids) and not self.from_results:
            raise ValueError("--least-confident and --ids need --from-results")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(ExplainConfig, __doc__, prog="morphocam-explain")
    args = config_from_args(ExplainConfig, parser.parse_args(argv), parser)
    model = args.model
    if args.from_results:
        records = read_records(args.from_results)
        try:
            ids = select_from_results(records, args.least_confident, args.ids)
        except ValueError as exc:
            parser.error(str(exc))
        if model is None:
            models = {r.get("model") for r in records if r.get("model")}
            if len(models) != 1:
                parser.error(f"--model is needed (results name {sorted(models)})")
            model = models.pop()
    else:
        ids = list(args.paths)
    if model is None:
        parser.error("--model is needed")
    target = int(args.target_class) if args.target_class.lstrip("-").isdigit() else None
    if target is None:
        classes = DATASET_CLASSES.get(dataset_for_model(model), ())
        if args.target_class not in classes:
            parser.error(f"--target-class {args.target_class!r} is not one of {list(classes)}")
        target = classes.index(args.target_class)
    try:
        done = explain_frames(ids, args.urls, model, args.output_dir, target, timeout_s=args.timeout_s,
                              ssl=args.ssl, root_certificates=args.root_certificates)
    except Exception as exc:  # noqa: BLE001
        print(f"morphocam-explain: {exc}", file=sys.stderr)
        return 3
    for ex in done:
        print(f"{ex.frame_id}: {ex.predicted_class} p={ex.probability:.3f} -> {ex.overlay_path}")
    if done:
        print(f"contact sheet: {Path(args.output_dir) / 'contact_sheet.png'}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
