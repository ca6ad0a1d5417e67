"""``morphocam-demo``: the whole pipeline on the bundled samples, end to end.

Starts ``tritonserver`` on the committed ``model_repository/`` (free loopback ports), streams
``samples/hushem`` through ``morphocam_hushem`` and ``samples/smids`` through ``morphocam_smids``
with the streaming client — and the SMIDS samples again with the blank, noise and corrupted frames of
``samples/smids_shifted`` mixed in, to show the report excluding the frames the model flags as
out-of-domain — prints each per-sample report, explains the 3 least confident frames,
says where everything was written (default ``out/demo/``), and stops the server.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from morphocam.config import option, parse_config
from morphocam.contract import explain_model_for, model_name_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("hushem", "smids")
# shifted samples: name -> (the dataset whose model classifies them, folders streamed as one sample)
SHIFTED_SAMPLES = {"smids_shifted": ("smids", ("smids", "smids_shifted"))}

BUILD_HINT = """\
The model repository {repo} {problem}.
Build it from trained checkpoints first, e.g.:
    morphocam-train --dataset hushem --data-dir ../shared/datasets/hushem --output-dir results/training/hushem
    morphocam-train --dataset smids --data-dir ../shared/datasets/smids --output-dir results/training/smids
    morphocam-export --checkpoints results/training/hushem/model.safetensors,results/training/smids/model.safetensors \\
        --output model_repository
(see README.md), or point --model-repository at an existing repository."""


def served_models(repo: Path) -> dict[str, tuple[str, bool]]:
    """dataset -> (model name, has an explain model) for the models present in the repository."""
    found = {}
    for ds in DATASETS:
        name = model_name_for(ds)
        if (repo / name / "config.pbtxt").is_file():
            found[ds] = (name, (repo / explain_model_for(name) / "config.pbtxt").is_file())
    return found


@dataclass
class DemoConfig:
    """Every option of ``morphocam-demo``."""

    model_repository: Path = option("Triton model repository to serve", PROJECT_ROOT / "model_repository")
    samples: Path = option("folder holding one sub-folder of frames per dataset", PROJECT_ROOT / "samples")
    output_dir: Path = option("where results, reports and explanations go", Path("out/demo"))
    explain: int = option("explain this many least-confident frames per model", 3)
    batch_size: int = option("frames per request", 8)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config(DemoConfig, argv, __doc__, prog="morphocam-demo")

    repo = args.model_repository
    if not repo.is_dir():
        print(BUILD_HINT.format(repo=repo, problem="does not exist"), file=sys.stderr)
        return 2
    models = served_models(repo)
    if not models:
        print(BUILD_HINT.format(repo=repo, problem="holds no morphocam_<dataset> model"), file=sys.stderr)
        return 2
    jobs = [(ds, *models[ds], (ds,)) for ds in DATASETS if ds in models and (args.samples / ds).is_dir()]
    jobs += [(name, *models[ds], folders) for name, (ds, folders) in SHIFTED_SAMPLES.items()
             if ds in models and all((args.samples / f).is_dir() for f in folders)]
    for ds in DATASETS:
        if ds not in models:
            print(f"demo: {model_name_for(ds)} is not in {repo}; skipping the {ds} samples", file=sys.stderr)
    if not jobs:
        print(f"demo: no samples under {args.samples} for the served models {sorted(models)}", file=sys.stderr)
        return 2

    # Only the demo starts servers; the clients themselves never import serving.
    from morphocam.serving.launcher import ServerStartError, TritonServer
    from tqdm import tqdm

    from morphocam.clients.classify_cli import format_summary
    from morphocam.clients.explain_cli import explain_frames, select_from_results
    from morphocam.clients.report import build_report, format_text, write_report
    from morphocam.clients.results_io import ResultWriter
    from morphocam.clients.sources import count_inputs, expand_inputs
    from morphocam.clients.streaming import ClientOptions, StreamingClassifier

    out = args.output_dir
    print(f"demo: starting tritonserver on {repo} ...", file=sys.stderr)
    t0 = time.monotonic()
    try:
        server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=300).start()
    except ServerStartError as exc:
        print(f"demo: the server did not start: {exc}", file=sys.stderr)
        return 3
    written: list[str] = []
    try:
        for note in server.warnings:
            print(f"demo: warning: {note}", file=sys.stderr)
        print(f"demo: server ready at {server.grpc_url} in {time.monotonic() - t0:.1f} s "
              f"({server.classifier_engine} classifiers)", file=sys.stderr)
        for ds, model, has_explain, sample_folders in jobs:
            folders = []
            for name in sample_folders:
                rel = Path(os.path.relpath(args.samples / name))
                folders.append(str(args.samples / name if rel.parts[:1] == ("..",) else rel))  # short, stable ids
            results_path = out / ds / "results.jsonl"
            opts = ClientOptions(urls=(server.grpc_url,), model=model, batch_size=args.batch_size)
            classifier = StreamingClassifier(opts)
            records = []
            with ResultWriter(results_path, "jsonl", classifier.info.classes) as writer, \
                    tqdm(total=count_inputs(folders), unit="frame", desc=model, file=sys.stderr) as bar:
                for rec in classifier.run(expand_inputs(folders)):
                    writer.write(rec)
                    records.append(rec)
                    bar.update(1)
            summary = classifier.stats.summary()
            print(format_summary(summary), file=sys.stderr)
            report = build_report(records, classes=classifier.info.classes, sample=f"{ds} samples ({' + '.join(folders)})")
            paths = write_report(report, out / ds / "report")
            print()
            print(format_text(report))
            written += [f"{ds} results: {results_path}", f"{ds} report:  {paths['html']} (+ report.json)"]
            if has_explain and args.explain > 0:
                ids = select_from_results(records, least_confident=args.explain)
                explained = explain_frames(ids, [server.grpc_url], model, out / ds / "explain")
                print(f"  explained the {len(explained)} least confident frames:")
                for ex in explained:
                    print(f"    {ex.frame_id}: {ex.predicted_class} p={ex.probability:.2f} -> {ex.overlay_path}")
                written.append(f"{ds} explanations: {out / ds / 'explain' / 'contact_sheet.png'} "
                               f"(+ overlays, heatmaps .npy)")
    finally:
        server.stop()
        print("demo: server stopped", file=sys.stderr)
    print("\nWritten:")
    for line in written:
        print(f"  {line}")
    print("These are decision aids for a trained reviewer, not diagnoses.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
