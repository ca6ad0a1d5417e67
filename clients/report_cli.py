"""``morphocam-report results.jsonl --output-dir DIR``: per-sample report (JSON + one-page HTML)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from morphocam.config import build_parser, config_from_args, option

from morphocam.clients.report import build_report, format_text, write_report
from morphocam.clients.results_io import read_records


@dataclass
class ReportConfig:
    """Every option of ``morphocam-report``."""

    results: tuple[Path, ...] = option("results file(s) from morphocam-classify (jsonl or csv)", (),
                                       positional=True, nargs="+", metavar="RESULTS")
    output_dir: Optional[Path] = option("where report.json / report.html go", None, required=True)
    sample: str = option("sample name shown on the report (default: the file names)", "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(ReportConfig, __doc__, prog="morphocam-report")
    args = config_from_args(ReportConfig, parser.parse_args(argv), parser)
    records = []
    for path in args.results:
        if not path.is_file():
            parser.error(f"{path}: no such results file")
        records += read_records(path)
    if not records:
        print(f"morphocam-report: no complete records in {[str(r) for r in args.results]}", file=sys.stderr)
        return 1
    report = build_report(records, sample=args.sample or ", ".join(r.name for r in args.results))
    paths = write_report(report, args.output_dir)
    print(format_text(report))
    print(f"report: {paths['html']}  {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
