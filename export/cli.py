"""``morphocam-export``: checkpoints -> a validated Triton model repository, with a summary at the end."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from morphocam.config import parse_config

from .errors import ExportError
from .config import ExportConfig


def summary(results, out: Path) -> str:
    lines = [f"model repository {out}:"]
    for res in results:
        card = res.card
        exp = card["export"]
        lines.append(f"  {res.name}: {exp['engine']} {exp['precision']} ({exp['model_file']}), parity max |Δprob| "
                     f"{exp['parity']['max_abs_prob_diff']:.2e} on {exp['parity']['images']} real images")
        for m in (card.get("engines") or {}).get("measurements", []):
            lines.append(f"      {m['engine']:11s} {m['precision']:4s} {m['images_per_second']:7.1f} img/s  "
                         f"acc {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  agree {m['agreement_with_fp32']:.4f}")
        for folder in res.folders:
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                lines.append(f"      {f.relative_to(out)}  {f.stat().st_size / 1e6:.2f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExportConfig, argv, "Export morphocam checkpoints into a Triton model repository.",
                       prog="morphocam-export")
    from morphocam.training.checkpoint import CheckpointError

    from .repository import write_repository

    t0 = time.time()
    try:
        results = write_repository(cfg)
    except (CheckpointError, ExportError) as exc:
        print(f"morphocam-export: error: {exc}\n(nothing was written to {cfg.output})", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, disk full, file-size limit: staging is removed, output untouched
        print(f"morphocam-export: error: cannot write the repository: {exc} (is {cfg.output} on a full or "
              f"read-only disk?)\n(nothing was written to {cfg.output})", file=sys.stderr)
        return 2
    print(summary(results, Path(cfg.output).resolve()))
    print(f"[export] done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
