"""Results files: JSON Lines (default) or CSV, one complete line per frame, crash-safe and resumable.

Each record is written with a single ``write`` of a whole line ending in ``\\n``, then flushed
(and fsynced every ``fsync_every`` records), so a crash can only leave an unterminated last line.
Readers (``--resume``, the report, the explainer) treat an unterminated or unparsable last line as
never written; ``--resume`` cuts it off before appending.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

FORMATS = ("jsonl", "csv")
CSV_FIXED = ["frame_id", "status", "predicted_class", "class_index", "confidence", "in_domain", "ood_score",
             "prediction_set", "model", "model_version", "server", "latency_ms", "error"]
SET_SEPARATOR = "|"  # prediction_set in a CSV cell: class names joined


def _complete_lines(data: bytes) -> tuple[list[bytes], int]:
    """Complete lines and the byte length they occupy (an unterminated tail is dropped)."""
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), end


def read_records(path: Path, fmt: str | None = None) -> list[dict]:
    """All complete records of a results file (a truncated last line is ignored)."""
    records, _ = _read(Path(path), fmt or guess_format(path))
    return records


def guess_format(path: Path) -> str:
    return "csv" if str(path).lower().endswith(".csv") else "jsonl"


def _read(path: Path, fmt: str) -> tuple[list[dict], int]:
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    lines, end = _complete_lines(data)
    records: list[dict] = []
    if fmt == "jsonl":
        good_end = 0
        offset = 0
        for raw in lines:
            offset += len(raw) + 1
            if not raw.strip():
                good_end = offset
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                # Only a final line can be half-written; anything after it is not trusted either.
                break
            if not isinstance(rec, dict) or "frame_id" not in rec:
                break
            records.append(rec)
            good_end = offset
        return records, good_end
    # CSV: header + rows; values are strings, probabilities in p_<class> columns.
    text = data[:end].decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
        if row.get("frame_id") is None or None in row:
            break
        records.append(csv_row_to_record(row))
    return records, end


def csv_row_to_record(row: dict) -> dict:
    rec: dict = {"frame_id": row["frame_id"], "status": row.get("status") or "ok"}
    probs = {k[2:]: float(v) for k, v in row.items() if k.startswith("p_") and v not in ("", None)}
    if rec["status"] == "ok":
        rec.update(predicted_class=row.get("predicted_class"), class_index=int(row.get("class_index") or -1),
                   confidence=float(row.get("confidence") or 0.0), probabilities=probs)
    else:
        rec["error"] = row.get("error", "")
    for key in ("model", "model_version", "server"):
        if row.get(key):
            rec[key] = row[key]
    if rec["status"] == "ok" and row.get("in_domain") not in (None, ""):
        rec["in_domain"] = row["in_domain"].lower() == "true"
        rec["ood_score"] = float(row["ood_score"]) if row.get("ood_score") else None
        rec["prediction_set"] = [c for c in (row.get("prediction_set") or "").split(SET_SEPARATOR) if c]
    if row.get("latency_ms"):
        rec["latency_ms"] = float(row["latency_ms"])
    return rec


class ResultWriter:
    """Append records to a results file, one flushed line each; resumable."""

    def __init__(self, path: Path | None, fmt: str = "jsonl", classes: Sequence[str] = (),
                 resume: bool = False, fsync_every: int = 64, stream=None):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.path = Path(path) if path is not None else None
        self.fmt = fmt
        self.classes = list(classes)
        self.fsync_every = fsync_every
        self.done_keys: set[str] = set()
        self.previous: list[dict] = []
        self._count = 0
        self._header: list[str] | None = None
        if self.path is None:
            self._fh = stream
            self._write_header_if_needed(empty=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            from morphocam.clients.sources import resume_key

            records, good_end = _read(self.path, fmt)
            self.previous = records
            self.done_keys = {resume_key(r["frame_id"]) for r in records}
            with open(self.path, "r+b") as fh:  # drop a half-written last line before appending
                fh.truncate(good_end)
            if fmt == "csv" and good_end > 0:
                with open(self.path, newline="") as fh:
                    self._header = next(csv.reader(fh), None)
            self._fh = open(self.path, "a", encoding="utf-8", newline="")
            self._write_header_if_needed(empty=good_end == 0)
        else:
            self._fh = open(self.path, "w", encoding="utf-8", newline="")
            self._write_header_if_needed(empty=True)

    def _columns(self) -> list[str]:
        return CSV_FIXED[:5] + [f"p_{c}" for c in self.classes] + CSV_FIXED[5:]

    def _write_header_if_needed(self, empty: bool) -> None:
        if self.fmt != "csv" or self._fh is None:
            return
        if empty or self._header is None:
            self._header = self._columns()
            self._emit(_csv_line(self._header))

    def _emit(self, line: str) -> None:
        self._fh.write(line)  # one call per whole line
        self._fh.flush()
        self._count += 1
        if self.path is not None and self.fsync_every and self._count % self.fsync_every == 0:
            os.fsync(self._fh.fileno())

    def write(self, record: dict) -> None:
        if self.fmt == "jsonl":
            self._emit(json.dumps(record, separators=(",", ":")) + "\n")
            return
        probs = record.get("probabilities") or {}
        row = []
        for col in self._header or self._columns():
            if col.startswith("p_"):
                v = probs.get(col[2:])
                row.append("" if v is None else f"{v:.6g}")
            else:
                v = record.get(col)
                if isinstance(v, list):
                    v = SET_SEPARATOR.join(v)
                row.append("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)))
        self._emit(_csv_line(row))

    def close(self) -> None:
        if self._fh is not None and self.path is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _csv_line(values: Iterable[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(list(values))
    return buf.getvalue()
