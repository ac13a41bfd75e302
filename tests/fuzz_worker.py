"""Run fuzz cases for tests/test_fuzz.py in a process of its own.

    python fuzz_worker.py JOBS.json RESULTS.jsonl

A case is {"id", "family", "format": "savedmodel"|"keras"|"targeted", "base", "seed", "name"}: the
worker builds the damaged copy from the seed or the targeted damage's name (tests/damage.py), calls gbp_rewrite.inspect and gbp_rewrite.convert on it
in this process, and appends one JSON line of facts (outcome and exception type of each call, the
message's line count, whether a destination or a temporary directory was left, whether the source
changed, whether a successful export is complete). A "started" line goes before each case, so if
TensorFlow aborts the process, the parent knows which case did it.

Each case runs under a watchdog: faulthandler dumps every thread's stack and exits the worker when a
case takes longer than the timeout, so a hang becomes a failure that names the case.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import damage  # noqa: E402
import gbp_rewrite  # noqa: E402
from fingerprints import source_fingerprint  # noqa: E402
from gbp_rewrite.errors import GbpError  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402


def outcome(call) -> dict:
    try:
        result = call()
        if hasattr(result, "to_text"):
            result.to_text()
            json.dumps(result.to_dict())
        return {"status": "ok"}
    except GbpError as e:
        return {"status": "GbpError", "type": type(e).__name__, "message": str(e),
                "lines": len([line for line in str(e).splitlines() if line.strip()])}
    except Exception as e:  # noqa: BLE001 - exactly what the fuzz looks for
        import traceback

        return {"status": "crash", "type": type(e).__name__, "message": str(e)[:500],
                "traceback": traceback.format_exc()[-3000:]}


def export_is_complete(export_dir: Path, source: Path) -> bool:
    """The parts every explainable export has: a parseable graph with explain_class, the report,
    and every file of the source's assets/ (a vocabulary the export would otherwise lack)."""
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    except Exception:  # noqa: BLE001
        return False
    signatures = {key for meta_graph in proto.meta_graphs for key in meta_graph.signature_def}
    return ("explain_class" in signatures and (export_dir / "assets" / "gbp_rewrite_report.json").is_file()
            and _asset_files(source) <= _asset_files(export_dir))


def _asset_files(model: Path) -> set[str]:
    """Paths of the files under `model`/assets, relative to it (none for a .keras file)."""
    assets = model / "assets"
    return {str(p.relative_to(assets)) for p in assets.rglob("*") if p.is_file()} if assets.is_dir() else set()


def run_case(case: dict, work: Path) -> dict:
    rng = random.Random(case["seed"])
    folder = work / f"case-{case['id']}"
    folder.mkdir(parents=True)
    base = Path(case["base"])
    if case["format"] == "keras":
        source = folder / "model.keras"
        note = damage.damage_keras_file(base, source, rng)
    elif case["format"] == "targeted":
        source = folder / ("model.keras" if case["family"] == "keras" else "model")
        note = damage.damage_targeted(case["name"], base, source)
    else:
        source = folder / "model"
        note = damage.damage_savedmodel(base, source, rng)
    destination = folder / "out" / "explainable"
    before = source_fingerprint(source)
    started = time.perf_counter()
    facts = {
        "id": case["id"], "family": case["family"], "note": note,
        "inspect": outcome(lambda: gbp_rewrite.inspect(source)),
        "convert": outcome(lambda: gbp_rewrite.convert(source, destination)),
    }
    facts["seconds"] = round(time.perf_counter() - started, 2)
    facts["source_changed"] = source_fingerprint(source) != before
    facts["destination_exists"] = destination.exists()
    parent = destination.parent
    facts["leftovers"] = sorted(p.name for p in parent.iterdir() if p.name != destination.name) if parent.exists() else []
    if facts["convert"]["status"] == "ok":
        facts["export_complete"] = export_is_complete(destination, source)
    shutil.rmtree(folder, ignore_errors=True)
    return facts


def main(jobs_file: str, results_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    work, timeout = Path(jobs["work"]), float(jobs["timeout"])
    with open(results_file, "a", encoding="utf-8") as results:
        for case in jobs["cases"]:
            results.write(json.dumps({"id": case["id"], "started": True}) + "\n")
            results.flush()
            faulthandler.dump_traceback_later(timeout, exit=True)  # a hang ends the worker, loudly
            facts = run_case(case, work)
            faulthandler.cancel_dump_traceback_later()
            results.write(json.dumps(facts) + "\n")
            results.flush()


if __name__ == "__main__":
    faulthandler.enable()  # a C++ abort prints the Python stack of the case too
    main(*sys.argv[1:])
