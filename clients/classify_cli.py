"""``morphocam-classify``: stream frames to a Triton server, one result line per frame, in order.

    morphocam-classify --url 127.0.0.1:8001 --model morphocam_smids --output results.jsonl INPUT...

INPUT: image files, folders (recursive), globs (quote them), a video file, or ``-`` for a stream of
``.npy`` arrays on stdin. Exit status: 0 all frames answered (error records included), 2 bad
usage, 3 the servers stayed unreachable past the retry deadline (rerun with ``--resume``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from morphocam.config import option, parse_config

from morphocam.clients.options import ClientOptions
from morphocam.clients.results_io import FORMATS, ResultWriter
from morphocam.clients.sources import count_inputs, expand_inputs
from morphocam.clients.streaming import ServerUnavailable, StreamingClassifier


@dataclass
class ClassifyConfig(ClientOptions):
    """Every option of ``morphocam-classify``: the streaming client's options plus input and output."""

    inputs: tuple[str, ...] = option("files, folders, globs, a video, or - (npy on stdin)", (),
                                     positional=True, nargs="+", metavar="INPUT")
    output: Optional[Path] = option("results file (default: stdout)", None, aliases=("-o",))
    format: Optional[str] = option("jsonl or csv (default: csv for a .csv --output, else jsonl)", None,
                                   choices=FORMATS)
    resume: bool = option("skip frames already answered in --output and append", False, switch=True)
    progress: bool = option("progress bar on stderr", True, switch=True)
    summary_json: Optional[Path] = option("also write the final summary here", None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume and self.output is None:
            raise ValueError("--resume needs --output")
        self.check_certificates()
        if self.format is None:
            self.format = "csv" if self.output is not None and Path(self.output).suffix.lower() == ".csv" else "jsonl"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config(ClassifyConfig, argv, __doc__, prog="morphocam-classify")
    try:
        classifier = StreamingClassifier(args)
    except (ServerUnavailable, RuntimeError) as exc:
        print(f"morphocam-classify: {exc}", file=sys.stderr)
        return 3
    info = classifier.info
    print(f"morphocam-classify: {info.name} v{info.version or '?'} input {info.height}x{info.width}, "
          f"classes {list(info.classes)}, batch {classifier.batch_size}, servers {list(args.urls)}",
          file=sys.stderr)
    try:
        writer = ResultWriter(args.output, args.format, info.classes, resume=args.resume,
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
    if args.progress:
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
