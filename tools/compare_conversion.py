"""Compare the conversion time of this checkout with another one, in alternating runs.

The host's speed drifts by up to 3x within an hour, so one conversion timed before a change and one
after say little. This runs `gbp-rewrite convert` of the same source with the two checkouts in
turn (ABBA order), each in a fresh process, and prints per-round times and the medians of the
per-round ratios (this checkout / the other) of wall time, in-call time (the report's seconds) and
CPU time.

    git worktree add /tmp/base HEAD~3
    .venv/bin/python tools/compare_conversion.py --base /tmp/base --model resnet50 --rounds 6

The other checkout needs no install: it is put first on PYTHONPATH, and the processes run in a
temporary directory (`python -m` would otherwise import the package from the working directory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import MODELS, REPO, build_source  # noqa: E402  pylint: disable=wrong-import-position

MEASURES = ("wall", "in-call", "cpu")


def convert_once(checkout: Path, source: Path, destination: Path, workdir: Path) -> dict[str, float]:
    """One `gbp-rewrite convert` with `checkout`'s package: wall, in-call and CPU seconds."""
    env = dict(os.environ, PYTHONPATH=str(checkout), TF_CPP_MIN_LOG_LEVEL="3")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "gbp_rewrite.cli", "convert", "--json", "--overwrite", str(source), str(destination)],
        env=env, cwd=workdir, capture_output=True, text=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise SystemExit(f"conversion with {checkout} failed:\n{child.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "in-call": json.loads(child.stdout)["seconds"], "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the other checkout (a directory holding gbp_rewrite/)")
    parser.add_argument("--model", default="resnet50", choices=MODELS)
    parser.add_argument("--rounds", type=int, default=6, help="rounds; each converts once with each checkout")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gbp_rewrite_benchmark"),
                        help="where source models are kept between runs (shared with benchmark.py)")
    args = parser.parse_args()
    checkouts = {"this": REPO, "base": Path(args.base).resolve()}
    if not (checkouts["base"] / "gbp_rewrite" / "__init__.py").is_file():
        parser.error(f"--base {args.base!r} holds no gbp_rewrite package")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source = build_source(args.model, workdir)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="gbp_rewrite_compare_") as tmp:
        for round_index in range(args.rounds):
            order = list(checkouts) if round_index % 2 == 0 else list(reversed(checkouts))
            for name in order:
                result = convert_once(checkouts[name], source, Path(tmp) / name, Path(tmp))
                times[name].append(result)
                print(f"round {round_index + 1} {name:>4}: " + "  ".join(f"{m} {result[m]:5.1f} s" for m in MEASURES),
                      flush=True)
    for measure in MEASURES:
        ratios = [t[measure] / b[measure] for t, b in zip(times["this"], times["base"])]
        print(f"{measure:>8}: this/base median {statistics.median(ratios):.2f}  "
              f"(medians this {statistics.median(t[measure] for t in times['this']):.1f} s, "
              f"base {statistics.median(b[measure] for b in times['base']):.1f} s)")


if __name__ == "__main__":
    main()
