"""``morphocam-bench``: one sub-command per benchmark; each writes JSON + PNG and prints a table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from morphocam.config import parse_config

USAGE = """morphocam-bench COMMAND [options]

commands:
  serving       in-process engines vs the real Triton server (throughput, latency, ratio)
  sweep         the served classifier over engine x instances x threads x queue delay
  accuracy      the paper's ablation table on the seeded split, plus k-fold CV of the full model
  calibration   ECE before/after temperature scaling for a checkpoint
  trust         calibration, conformal coverage, OOD AUROC (other dataset, blank/noise, corruptions), cost
  explanations  Grad-CAM++ faithfulness (deletion test) and cost per explanation
  soak          bounded mixed classify + explain load on a server it starts: failures, RSS, /dev/shm, p99
Run 'morphocam-bench COMMAND --help' for a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serving":
        from .serving import ServingBenchConfig, run

        run(parse_config(ServingBenchConfig, rest, "Served vs in-process throughput and latency.",
                         prog="morphocam-bench serving"))
    elif command == "sweep":
        from .serving_sweep import SweepConfig, run

        run(parse_config(SweepConfig, rest, "Serving configuration sweep.", prog="morphocam-bench sweep"))
    elif command == "accuracy":
        from .accuracy import AccuracyConfig, run

        run(parse_config(AccuracyConfig, rest, "Paper ablation and k-fold accuracy.", prog="morphocam-bench accuracy"))
    elif command == "trust":
        from .trust import TrustBenchConfig, run

        run(parse_config(TrustBenchConfig, rest, "Calibrated probabilities, conformal sets and the OOD flag.",
                         prog="morphocam-bench trust"))
    elif command == "soak":
        from .soak import SoakConfig, run

        result = run(parse_config(SoakConfig, rest, "Bounded soak: mixed classify + explain traffic.",
                                  prog="morphocam-bench soak"))
        ok = (result["failed_requests"] == 0 and result.get("rss_within_bound")
              and not result["shm_segments_after_shutdown"])
        return 0 if ok else 1
    elif command in ("calibration", "explanations"):
        parser = argparse.ArgumentParser(prog=f"morphocam-bench {command}")
        parser.add_argument("--checkpoint", type=Path, action="append", required=True)
        parser.add_argument("--data-dir", type=Path, required=True)
        parser.add_argument("--output-dir", type=Path, default=Path(f"results/benchmarks/{command}"))
        parser.add_argument("--limit", type=int, default=None, help="explanations: at most this many test frames")
        args = parser.parse_args(rest)
        if command == "calibration":
            from .calibration import run

            for ckpt in args.checkpoint:
                run(ckpt, args.data_dir, args.output_dir)
        else:
            from .explanations import run

            run(args.checkpoint, args.data_dir, args.output_dir, limit=args.limit)
    else:
        print(f"morphocam-bench: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return 0
