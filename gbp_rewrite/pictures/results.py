"""The record of an explain run: results.csv and summary.json, written as the images go by.

Both files grow one entry per image and are flushed after every batch, so a run over many
thousands of images keeps no list of them in memory. results.csv is readable while the run goes
on; summary.json is written under a temporary name and renamed when the run ends, so a
summary.json that exists is always complete, valid JSON.

    results.csv   file,status,class,score,heatmap,overlay,guided,reason
                  (with Grad-CAM in the export: ...,guided,gradcam,guided_gradcam,reason)
    summary.json  {<run settings>, "images": [{"file", "status", "class", "score", "outputs"} or
                   {"file", "status", "reason"}, ...], "skipped": [...], "counts": {...}, "seconds"}
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
CSV_COLUMNS = ("file", "status", "class", "score", "heatmap", "overlay", "guided", "reason")
PICTURES = ("heatmap", "overlay", "guided")
CAM_PICTURES = ("gradcam", "guided_gradcam")  # exports converted with --cam (gbp_rewrite.cam)


class ResultFiles:
    """Writes results.csv and summary.json in `out_dir`; use as a context manager."""

    def __init__(self, out_dir: Path, header: Mapping[str, Any], *, cam: bool = False):
        self.csv_path = out_dir / RESULTS_CSV
        self.json_path = out_dir / SUMMARY_JSON
        self._json_tmp = out_dir / f".{SUMMARY_JSON}.{os.getpid()}.tmp"
        self._header = dict(header)
        self._counts = {"explained": 0, "failed": 0}
        self._pictures = PICTURES + (CAM_PICTURES if cam else ())
        self._columns = CSV_COLUMNS[:-1] + (CAM_PICTURES if cam else ()) + CSV_COLUMNS[-1:]

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

    def add_explained(self, file: str, class_index: int, score: float, pictures: Mapping[str, str]) -> None:
        self._csv.writerow([file, "explained", class_index, repr(float(score)),
                            *(pictures[kind] for kind in self._pictures), ""])
        self._add_json({"file": file, "status": "explained", "class": class_index, "score": float(score),
                        "outputs": {kind: pictures[kind] for kind in self._pictures}})
        self._counts["explained"] += 1

    def add_failed(self, file: str, reason: str) -> None:
        self._csv.writerow([file, "failed", *([""] * (len(self._columns) - 3)), reason])
        self._add_json({"file": file, "status": "failed", "reason": reason})
        self._counts["failed"] += 1

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
