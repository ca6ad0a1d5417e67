"""``morphocam-report results.jsonl --output-dir DIR``: per-sample report (JSON + one-page HTML)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from morphocam.clients.report import build_report, format_text, write_report
from morphocam.clients.results_io import read_records


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="morphocam-report", description=__doc__)
    p.add_argument("results", type=Path, nargs="+", help="results file(s) from morphocam-classify (jsonl or csv)")
    p.add_argument("--output-dir", type=Path, required=True, help="where report.json / report.html go")
    p.add_argument("--sample", default="", help="sample name shown on the report (default: the file name)")
    args = p.parse_args(argv)
    records = []
    for path in args.results:
        if not path.is_file():
            p.error(f"{path}: no such results file")
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
