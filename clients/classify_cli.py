"""``morphocam-classify``: stream frames to a Triton server, one result line per frame, in order.

    morphocam-classify --url 127.0.0.1:8001 --model morphocam_smids --output results.jsonl INPUT...

INPUT: image files, folders (recursive), globs (quote them), a video file, or ``-`` for a stream of
``.npy`` arrays on stdin. Exit status: 0 all frames answered (error records included), 2 bad
usage, 3 the servers stayed unreachable past the retry deadline (rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from morphocam.clients.results_io import FORMATS, ResultWriter
from morphocam.clients.sources import count_inputs, expand_inputs
from morphocam.clients.streaming import ClientOptions, ServerUnavailable, StreamingClassifier


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="morphocam-classify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs, a video, or - (npy on stdin)")
    p.add_argument("--url", action="append", dest="urls", metavar="HOST:PORT",
                   help="Triton gRPC endpoint; repeat for several servers (default 127.0.0.1:8001)")
    p.add_argument("--model", default="morphocam_smids", help="served model name (default %(default)s)")
    p.add_argument("--model-version", default="", help="model version (default: the server's policy)")
    p.add_argument("--output", "-o", type=Path, default=None, help="results file (default: stdout)")
    p.add_argument("--format", choices=FORMATS, default=None, help="jsonl (default) or csv; .csv outputs default to csv")
    p.add_argument("--resume", action="store_true", help="skip frames already answered in --output and append")
    p.add_argument("--batch-size", type=int, default=8, help="frames per request (capped by the model's max)")
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="send a partial batch after this wait")
    p.add_argument("--max-in-flight", type=int, default=4, help="requests in flight at once")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--retry-deadline", type=float, default=120.0,
                   help="give up after retrying a batch this many seconds (servers down)")
    p.add_argument("--workers", type=int, default=2, help="decode/resize worker threads")
    p.add_argument("--ssl", action="store_true", help="TLS to the server")
    p.add_argument("--root-certificates", type=Path, default=None, help="PEM file of CA certificates for --ssl")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", type=Path, default=None, help="also write the final summary here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = args.format or ("csv" if args.output and args.output.suffix.lower() == ".csv" else "jsonl")
    if args.resume and args.output is None:
        parser.error("--resume needs --output")
    if args.root_certificates and not args.ssl:
        parser.error("--root-certificates needs --ssl")
    if args.root_certificates and not args.root_certificates.is_file():
        parser.error(f"--root-certificates: {args.root_certificates} is not a file")
    try:
        opts = ClientOptions(urls=tuple(args.urls or ["127.0.0.1:8001"]), model=args.model,
                             model_version=args.model_version, batch_size=args.batch_size,
                             max_wait_ms=args.max_wait_ms, max_in_flight=args.max_in_flight,
                             timeout_s=args.timeout, retry_deadline_s=args.retry_deadline,
                             workers=args.workers, ssl=args.ssl,
                             root_certificates=str(args.root_certificates) if args.root_certificates else None)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        classifier = StreamingClassifier(opts)
    except (ServerUnavailable, RuntimeError) as exc:
        print(f"morphocam-classify: {exc}", file=sys.stderr)
        return 3
    info = classifier.info
    print(f"morphocam-classify: {info.name} v{info.version or '?'} input {info.height}x{info.width}, "
          f"classes {list(info.classes)}, batch {classifier.batch_size}, servers {list(opts.urls)}",
          file=sys.stderr)
    try:
        writer = ResultWriter(args.output, fmt, info.classes, resume=args.resume,
                              stream=sys.stdout if args.output is None else None)
    except OSError as exc:
        print(f"morphocam-classify: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.resume and writer.done_keys:
        print(f"morphocam-classify: resuming, {len(writer.done_keys)} frames already answered", file=sys.stderr)
    total = count_inputs(args.inputs)
    if total is not None and args.resume:
        total = max(0, total - len(writer.done_keys))
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="frame", desc="classify", file=sys.stderr, dynamic_ncols=True)
    code = 0
    try:
        for record in classifier.run(expand_inputs(args.inputs), writer.done_keys):
            writer.write(record)
            if bar is not None:
                bar.update(1)
                if record.get("status") != "ok":
                    bar.set_postfix(errors=classifier.stats.errors, refresh=False)
    except ServerUnavailable as exc:
        print(f"\nmorphocam-classify: {exc}\n  {classifier.stats.frames} results written; rerun the same "
              "command with --resume to finish", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:
        print(f"\nmorphocam-classify: interrupted; {classifier.stats.frames} results written "
              "(rerun with --resume)", file=sys.stderr)
        code = 130
    except OSError as exc:  # e.g. disk full: every line already written is complete
        print(f"\nmorphocam-classify: cannot write {args.output or 'stdout'}: {exc.strerror or exc}; "
              f"{classifier.stats.frames} complete results kept (rerun with --resume)", file=sys.stderr)
        code = 1
    except RuntimeError as exc:
        print(f"\nmorphocam-classify: {exc}", file=sys.stderr)
        code = 1
    finally:
        if bar is not None:
            bar.close()
        try:
            writer.close()
        except OSError:
            pass
    summary = classifier.stats.summary()
    summary.update(model=info.name, model_version=info.version, output=str(args.output or "-"))
    print(format_summary(summary), file=sys.stderr)
    if args.summary_json:
        from morphocam.atomic import atomic_write_text

        atomic_write_text(args.summary_json, json.dumps(summary, indent=2) + "\n")
    return code


def format_summary(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.1f} ms"

    return (f"summary: {s['frames']} frames ({s['classified']} classified, {s['errors']} errors, "
            f"{s['skipped']} skipped as already answered) in {s['wall_s']:.2f} s = "
            f"{s['frames_per_s'] or 0:.1f} frames/s; {s['batches']} batches, {s['retries']} retries; "
            f"request latency mean {ms(s['latency_ms_mean'])}, p50 {ms(s['latency_ms_p50'])}, "
            f"p99 {ms(s['latency_ms_p99'])}")


if __name__ == "__main__":
    sys.exit(main())
