"""Per-sample morphology report from a results file: counts, % normal forms with a Wilson 95% CI,
the WHO 6th-edition reference flag, as JSON and a one-page HTML with an embedded bar chart.

Counting rules:
* error records (frames that could not be classified) are excluded from every percentage and
  reported separately;
* classes in ``morphocam.contract.NON_CELL_CLASSES`` (SMIDS ``Non-Sperm``) are not cells: they
  are counted but excluded from the denominator ("cells assessed");
* normal forms are the classes in ``morphocam.contract.NORMAL_CLASSES``.

WHO laboratory manual, 6th edition (2021): the lower reference limit for normal forms is 4%;
assessing at least 200 spermatozoa is recommended.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from morphocam import plotting
from morphocam.contract import NON_CELL_CLASSES, NORMAL_CLASSES
from morphocam.stats import wilson_interval

WHO_NORMAL_LOWER_LIMIT_PCT = 4.0
WHO_MIN_CELLS = 200
DISCLAIMER = ("Decision aid only, not a diagnosis: an automated classification of the submitted images "
              "that a qualified andrologist or embryologist must review. It does not replace a semen "
              "analysis performed to the WHO laboratory manual.")


def build_report(records: Iterable[dict], classes: Sequence[str] | None = None, sample: str = "") -> dict:
    records = list(records)
    ok = [r for r in records if r.get("status", "ok") == "ok"]
    errors = [r for r in records if r.get("status", "ok") != "ok"]
    counts = Counter(r["predicted_class"] for r in ok)
    if classes is None:
        seen: list[str] = []
        for r in ok:
            for c in (r.get("probabilities") or {}):
                if c not in seen:
                    seen.append(c)
        classes = seen or sorted(counts)
    classes = list(classes) + sorted(c for c in counts if c not in classes)
    models = sorted({f"{r.get('model', '')}:{r.get('model_version', '')}".strip(":") for r in ok})
    non_cell = [c for c in classes if c in NON_CELL_CLASSES]
    normal = [c for c in classes if c in NORMAL_CLASSES]
    cells = sum(counts[c] for c in classes if c not in NON_CELL_CLASSES)
    n_normal = sum(counts[c] for c in normal)
    per_class = []
    for c in classes:
        is_cell = c not in NON_CELL_CLASSES
        per_class.append({
            "class": c, "count": counts[c], "is_cell": is_cell, "is_normal": c in NORMAL_CLASSES,
            "pct_of_classified": round(100.0 * counts[c] / len(ok), 2) if ok else None,
            "pct_of_cells": round(100.0 * counts[c] / cells, 2) if (cells and is_cell) else None,
        })
    flags: list[str] = []
    normal_pct = ci = None
    who_status = "not assessable"
    if not normal:
        flags.append("the model has no normal-form class: % normal forms is not defined")
    elif cells == 0:
        flags.append("no cells assessed: % normal forms is not defined")
    else:
        normal_pct = 100.0 * n_normal / cells
        lo, hi = wilson_interval(n_normal, cells)
        ci = [round(100 * lo, 2), round(100 * hi, 2)]
        if normal_pct < WHO_NORMAL_LOWER_LIMIT_PCT:
            who_status = "below the WHO lower reference limit"
            flags.append(f"normal forms {normal_pct:.1f}% < {WHO_NORMAL_LOWER_LIMIT_PCT:g}%: below the WHO "
                         "6th-edition lower reference limit")
        else:
            who_status = "at or above the WHO lower reference limit"
        if ci[0] < WHO_NORMAL_LOWER_LIMIT_PCT <= ci[1]:
            flags.append(f"the 95% CI ({ci[0]}–{ci[1]}%) spans the {WHO_NORMAL_LOWER_LIMIT_PCT:g}% limit: "
                         "the classification against the limit is uncertain")
    if cells < WHO_MIN_CELLS:
        flags.append(f"only {cells} cells assessed; the WHO manual recommends at least {WHO_MIN_CELLS}")
    if errors:
        flags.append(f"{len(errors)} frame(s) could not be classified and are excluded")
    if len(models) > 1:
        flags.append(f"results come from several models: {models}")
    return {
        "sample": sample,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": models,
        "frames": len(records),
        "classified": len(ok),
        "errors": len(errors),
        "non_cell_classes": non_cell,
        "non_cells": sum(counts[c] for c in non_cell),
        "cells_assessed": cells,
        "normal_classes": normal,
        "normal_forms": n_normal,
        "normal_forms_pct": round(normal_pct, 2) if normal_pct is not None else None,
        "normal_forms_ci95_pct": ci,
        "ci_method": "Wilson score interval, 95%",
        "who_reference": {"edition": "WHO laboratory manual, 6th edition (2021)",
                          "normal_forms_lower_limit_pct": WHO_NORMAL_LOWER_LIMIT_PCT,
                          "min_cells": WHO_MIN_CELLS, "status": who_status},
        "flags": flags,
        "classes": per_class,
        "error_frames": [{"frame_id": r["frame_id"], "error": r.get("error", "")} for r in errors],
        "disclaimer": DISCLAIMER,
    }


def bar_chart_png(report: dict) -> bytes:
    names = [c["class"] for c in report["classes"]]
    counts = [c["count"] for c in report["classes"]]
    colours = ["#2a9d8f" if c["is_normal"] else ("#9e9e9e" if not c["is_cell"] else "#e76f51")
               for c in report["classes"]]
    fig, ax = plotting.subplots(figsize=(6, 3), dpi=100)
    bars = ax.bar(names, counts, color=colours)
    for bar, c in zip(bars, report["classes"]):
        pct = c["pct_of_cells"] if c["pct_of_cells"] is not None else c["pct_of_classified"]
        label = f"{c['count']}" + (f"\n{pct:.1f}%" if pct is not None else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("frames")
    ax.set_ylim(0, max(counts + [1]) * 1.3)
    ax.set_title("Predicted class per frame (grey: not a cell)", fontsize=10)
    return plotting.png_bytes(fig)


def render_html(report: dict, chart_png: bytes | None = None) -> str:
    e = html.escape
    chart = chart_png if chart_png is not None else bar_chart_png(report)
    def pct_cell(c: dict) -> str:
        return "" if c["pct_of_cells"] is None else f"{c['pct_of_cells']:.1f}%"

    rows = "".join(
        f"<tr><td>{e(c['class'])}{' (normal)' if c['is_normal'] else ''}{'' if c['is_cell'] else ' (not a cell)'}"
        f"</td><td>{c['count']}</td><td>{pct_cell(c)}</td></tr>" for c in report["classes"])
    pct = report["normal_forms_pct"]
    ci = report["normal_forms_ci95_pct"]
    normal_line = ("not defined" if pct is None else f"{pct:.1f}% (95% CI {ci[0]:.1f}–{ci[1]:.1f}%, Wilson)")
    flags = "".join(f"<li>{e(f)}</li>" for f in report["flags"]) or "<li>none</li>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>morphocam report {e(report['sample'])}</title>
<style>body{{font-family:sans-serif;max-width:48em;margin:1.5em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #bbb;padding:.25em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.aid{{background:#fff3cd;border:1px solid #e0c36b;padding:.6em}}</style>
</head><body>
<h1>Sperm morphology: per-sample summary</h1>
<p class="aid"><strong>{e(report['disclaimer'])}</strong></p>
<p>Sample: {e(report['sample']) or '(unnamed)'} &middot; model(s): {e(', '.join(report['models']) or '-')}
&middot; generated {e(report['generated'])}</p>
<h2>Normal forms: {e(normal_line)}</h2>
<p>Cells assessed: <strong>{report['cells_assessed']}</strong> (frames {report['frames']}, classified
{report['classified']}, not cells {report['non_cells']}, unreadable {report['errors']}).
WHO 6th edition: {e(report['who_reference']['status'])} (lower reference limit
{report['who_reference']['normal_forms_lower_limit_pct']:g}% normal forms).</p>
<h3>Flags</h3><ul>{flags}</ul>
<table><tr><th>class</th><th>count</th><th>% of cells</th></tr>{rows}</table>
<p><img alt="bar chart of predicted classes" src="data:image/png;base64,{base64.b64encode(chart).decode()}"></p>
</body></html>
"""


def write_report(report: dict, output_dir: Path) -> dict[str, Path]:
    from morphocam.atomic import atomic_write_bytes, atomic_write_text

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    chart = bar_chart_png(report)
    paths = {"json": output_dir / "report.json", "html": output_dir / "report.html",
             "png": output_dir / "report_chart.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_bytes(paths["png"], chart)
    atomic_write_text(paths["html"], render_html(report, chart))
    return paths


def format_text(report: dict) -> str:
    lines = [f"morphocam report {report['sample']}".rstrip(), "  " + report["disclaimer"],
             f"  frames {report['frames']}  classified {report['classified']}  errors {report['errors']}  "
             f"cells assessed {report['cells_assessed']}"]
    for c in report["classes"]:
        pct = c["pct_of_cells"]
        lines.append(f"    {c['class']:<16} {c['count']:>5}  " + (f"{pct:5.1f}% of cells" if pct is not None
                                                                  else "  (not a cell)"))
    if report["normal_forms_pct"] is not None:
        lo, hi = report["normal_forms_ci95_pct"]
        lines.append(f"  normal forms {report['normal_forms_pct']:.1f}% (95% CI {lo:.1f}-{hi:.1f}%): "
                     f"{report['who_reference']['status']}")
    lines += [f"  ! {f}" for f in report["flags"]]
    return "\n".join(lines)
