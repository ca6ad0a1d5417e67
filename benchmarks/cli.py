"""``morphocam-bench``: one sub-command per benchmark; each writes JSON + PNG and prints a table
(``carry``, the accuracy benchmark's helper for runs that span sessions, only packs files).

Every sub-command's options come from its benchmark's configuration dataclass (the same plumbing as
the other console scripts, ``--config file.yaml`` included): ``morphocam-bench COMMAND --help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Sequence

from morphocam.config import add_options, config_from_args


@dataclass(frozen=True)
class Benchmark:
    module: str       # under morphocam.benchmarks
    config: str       # its configuration dataclass
    entry: str        # function taking that configuration and returning the result
    summary: str


BENCHMARKS: dict[str, Benchmark] = {
    "serving": Benchmark("serving", "ServingBenchConfig", "run",
                         "in-process engines vs the real Triton server (throughput, latency, ratio)"),
    "sweep": Benchmark("serving_sweep", "SweepConfig", "run",
                       "the served classifier over engine x instances x threads x queue delay"),
    "accuracy": Benchmark("accuracy", "AccuracyConfig", "run",
                          "the paper's ablation table on the seeded split, plus k-fold CV of the full model"),
    "probe": Benchmark("probe", "ProbeConfig", "run",
                       "linear probe of frozen ImageNet features per offline weights (a cheap screen before a CV)"),
    "ensemble": Benchmark("ensemble", "EnsembleBenchConfig", "run",
                          "several checkpoints averaged in one ONNX graph: accuracy gained vs served cost"),
    "calibration": Benchmark("calibration", "CalibrationConfig", "run_all",
                             "ECE before/after temperature scaling for a checkpoint"),
    "trust": Benchmark("trust", "TrustBenchConfig", "run",
                       "calibration, conformal coverage, OOD AUROC (other dataset, blank/noise, corruptions), cost"),
    "explanations": Benchmark("explanations", "ExplanationsConfig", "run_all",
                              "Grad-CAM++ faithfulness (deletion test) and cost per explanation"),
    "recovery": Benchmark("recovery", "RecoveryConfig", "run",
                          "time to recover from a killed stub or server under the supervisor, frames lost"),
    "soak": Benchmark("soak", "SoakConfig", "run",
                      "bounded mixed classify + explain load on a server it starts: failures, RSS, /dev/shm, p99"),
    "carry": Benchmark("carry", "CarryConfig", "run",
                       "pack the accuracy benchmark's stopped cells into committable parts (a fresh clone resumes them)"),
}


def _module(bench: Benchmark):
    return importlib.import_module(f"morphocam.benchmarks.{bench.module}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="morphocam-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, bench in BENCHMARKS.items():
        sub = commands.add_parser(name, help=bench.summary, description=bench.summary,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(sub, getattr(_module(bench), bench.config))
        sub.set_defaults(subparser=sub)  # so that a bad option value is reported with the sub-command's usage
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in BENCHMARKS:
        print(f"morphocam-bench: unknown command {argv[0]!r}\n", file=sys.stderr)
        parser.print_usage(sys.stderr)
        return 2
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    options = vars(parser.parse_args(argv))
    bench = BENCHMARKS[options.pop("command")]
    subparser = options.pop("subparser")
    module = _module(bench)
    cfg = config_from_args(getattr(module, bench.config), options, subparser)
    result = getattr(module, bench.entry)(cfg)
    # A benchmark with a verdict (the soak) turns it into the exit status; the others succeed by finishing.
    verdict = getattr(module, "passed", None)
    return 0 if verdict is None or verdict(result) else 1


if __name__ == "__main__":
    sys.exit(main())
