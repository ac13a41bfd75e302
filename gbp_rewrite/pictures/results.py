"""The record of an explain run: results.csv and summary.json, written as the images go by.

Both files grow one entry per image and are flushed after every batch, so a run over many
thousands of images keeps no list of them in memory. results.csv is readable while the run goes
on; summary.json is written under a temporary name and renamed when the run ends, so a
summary.json that exists is always complete, valid JSON.

    results.csv   file,status,class,label,rank,score,figure,heatmap,overlay,guided,reason
                  (with Grad-CAM in the export: ...,guided,gradcam,guided_gradcam,reason)
    summary.json  {<run settings>, "images": [{"file", "status", "class", "label", "rank", "score",
                   "outputs"} or {"file", "status", "reason"}, ...], "skipped": [...],
                   "counts": {...}, "seconds"}

One row per explained class: one per image, or `top_k` (rank 1, 2, ...). `label` is the class
name when the run had labels, else empty (null in JSON). A later run into the same folder
removes the pictures this summary lists (remove_previous_pictures), and only those.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping

from gbp_rewrite.errors import OutputError

RESULTS_CSV = "results.csv"
SUMMARY_JSON = "summary.json"
CSV_COLUMNS = ("file", "status", "class", "label", "rank", "score", "figure", "heatmap", "overlay",
               "guided", "reason")
PICTURES = ("figure", "heatmap", "overlay", "guided")
CAM_PICTURES = ("gradcam", "guided_gradcam")  # exports converted with --cam (gbp_rewrite.cam)


def csv_columns(*, cam: bool = False) -> tuple[str, ...]:
    """results.csv's columns: CSV_COLUMNS, with the Grad-CAM pictures before `reason` if `cam`."""
    return CSV_COLUMNS[:-1] + (CAM_PICTURES if cam else ()) + CSV_COLUMNS[-1:]


def explained_entry(file: str, class_index: int, score: float, pictures: Mapping[str, str], *,
                    label: str | None = None, rank: int = 1, cam: bool = False) -> tuple[list, dict]:
    """An explained image's results.csv row (csv_columns(cam=cam)) and summary.json record."""
    kinds = PICTURES + (CAM_PICTURES if cam else ())
    row = [file, "explained", class_index, label or "", rank, repr(float(score)),
           *(pictures[kind] for kind in kinds), ""]
    record = {"file": file, "status": "explained", "class": class_index, "label": label, "rank": rank,
              "score": float(score), "outputs": {kind: pictures[kind] for kind in kinds}}
    return row, record


def failed_entry(file: str, reason: str, *, cam: bool = False) -> tuple[list, dict]:
    """A failed image's results.csv row (csv_columns(cam=cam)) and summary.json record."""
    blanks = [""] * (len(csv_columns(cam=cam)) - 3)
    return [file, "failed", *blanks, reason], {"file": file, "status": "failed", "reason": reason}


class ResultFiles:
    """Writes results.csv and summary.json in `out_dir`; use as a context manager."""

    def __init__(self, out_dir: Path, header: Mapping[str, Any], *, cam: bool = False):
        self.csv_path = out_dir / RESULTS_CSV
        self.json_path = out_dir / SUMMARY_JSON
        self._json_tmp = out_dir / f".{SUMMARY_JSON}.{os.getpid()}.tmp"
        self._header = dict(header)
        self._counts = {"explained": 0, "failed": 0}
        self._cam = cam
        self._columns = csv_columns(cam=cam)

    def __enter__(self) -> "ResultFiles":
        try:
            self.json_path.unlink(missing_ok=True)  # a previous run's summary would not match
            self._csv_file = open(self.csv_path, "w", newline="", encoding="utf-8")
            self._json_file = open(self._json_tmp, "w", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write the results in '{self.csv_path.parent}': {e.strerror}") from None
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(self._columns)
        self._json_file.write("{\n")
        for key, value in self._header.items():
            self._json_file.write(f"  {json.dumps(key)}: {json.dumps(value)},\n")
        self._json_file.write('  "images": [')
        self._first = True
        return self

    def add_explained(self, file: str, class_index: int, score: float, pictures: Mapping[str, str], *,
                      label: str | None = None, rank: int = 1) -> None:
        self._add(*explained_entry(file, class_index, score, pictures, label=label, rank=rank, cam=self._cam))

    def add_failed(self, file: str, reason: str) -> None:
        self._add(*failed_entry(file, reason, cam=self._cam))

    def _add(self, row: list, record: dict) -> None:
        self._csv.writerow(row)
        self._add_json(record)
        self._counts[record["status"]] += 1

    def _add_json(self, record: dict) -> None:
        self._json_file.write(("\n    " if self._first else ",\n    ") + json.dumps(record))
        self._first = False

    def flush(self) -> None:
        self._csv_file.flush()
        self._json_file.flush()

    def finish(self, *, skipped: list[dict], seconds: float) -> None:
        """Close the JSON document and move summary.json into place."""
        counts = {"images": sum(self._counts.values()), **self._counts, "skipped": len(skipped)}
        self._json_file.write(("\n  " if not self._first else "") + "],\n")
        self._json_file.write(f'  "skipped": {json.dumps(skipped)},\n')
        self._json_file.write(f'  "counts": {json.dumps(counts)},\n')
        self._json_file.write(f'  "seconds": {round(seconds, 3)}\n}}\n')
        self._json_file.close()
        os.replace(self._json_tmp, self.json_path)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._csv_file.close()
        if not self._json_file.closed:
            self._json_file.close()
        Path(self._json_tmp).unlink(missing_ok=True)


def remove_previous_pictures(out_dir: Path) -> list[Path]:
    """Remove the pictures an earlier run's summary.json in `out_dir` lists, and only those.

    Names that are not plain file names in `out_dir` (a damaged or edited summary) are left alone;
    a summary that cannot be read removes nothing."""
    try:
        summary = json.loads((out_dir / SUMMARY_JSON).read_text(encoding="utf-8"))
        records = summary.get("images", [])
    except (OSError, ValueError, AttributeError):
        return []
    removed = []
    for record in records if isinstance(records, list) else []:
        outputs = record.get("outputs") if isinstance(record, dict) else None
        for name in (outputs or {}).values() if isinstance(outputs, dict) else []:
            if not isinstance(name, str) or not name.endswith(".png") or Path(name).name != name:
                continue
            path = out_dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
    return removed
