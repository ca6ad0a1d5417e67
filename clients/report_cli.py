"""``morphocam-report results.jsonl --output-dir DIR``: per-sample report (JSON + one-page HTML)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from morphocam.config import build_parser, config_from_args, option

from morphocam.clients.report import build_report, format_text, write_report
from morphocam.clients.results_io import read_records
from morphocam.clients.trust import MAX_OOD_SHARE


@dataclass
class ReportConfig:
    """Every option of ``morphocam-report``."""

    results: tuple[Path, ...] = option("results file(s) from morphocam-classify (jsonl or csv)", (),
                                       positional=True, nargs="+", metavar="RESULTS")
    output_dir: Optional[Path] = option("where report.json / report.html go", None, required=True)
    sample: str = option("sample name shown on the report (default: the file names)", "")
    max_ood_share: float = option("above this share of out-of-domain frames no percentage of normal forms is given (the sample "
                                  "must be assessed by hand)", MAX_OOD_SHARE)
    explanations: Optional[Path] = option("output folder of morphocam-explain (e.g. --uncertain): its overlays are "
                                          "linked from the uncertain frames", None)

    def __post_init__(self) -> None:
        if not 0 <= self.max_ood_share <= 1:
            raise ValueError("--max-ood-share must be in [0, 1]")


def explanation_links(folder: Path, report_dir: Path) -> dict[str, str]:
    """frame id -> overlay path relative to the report, from morphocam-explain's explanations.jsonl."""
    index = Path(folder) / "explanations.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found (run morphocam-explain --output-dir {folder} first)")
    links = {}
    for rec in read_records(index):
        if rec.get("overlay"):
            links[rec["frame_id"]] = os.path.relpath(Path(folder) / rec["overlay"], report_dir)
    return links


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
    links = None
    if args.explanations is not None:
        try:
            links = explanation_links(args.explanations, args.output_dir)
        except FileNotFoundError as exc:
            parser.error(str(exc))
    report = build_report(records, sample=args.sample or ", ".join(r.name for r in args.results),
                          max_ood_share=args.max_ood_share, explanations=links)
    paths = write_report(report, args.output_dir)
    print(format_text(report))
    print(f"report: {paths['html']}  {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
