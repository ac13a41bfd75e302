"""Benchmark: what an explanation costs next to a prediction and a plain input gradient.

For keras.applications ResNet50, VGG16 and MobileNetV2 (weights=None, classifier_activation=None:
no download) and the testdata CNN, at batch 1 and 8, this measures side by side in one process,
interleaved call by call (the machine is shared and noisy; ratios of interleaved medians are what
can be trusted):

  (a) the source SavedModel's serving signature (a prediction),
  (b) the explainable export's serving signature (prediction + saliency + class),
  (c) a tf.function taking the plain input gradient of the top class through the source SavedModel:
      the floor for any gradient-based explanation,

and, per model, the conversion's wall time and peak RSS (in a child process, as a user runs it) and
the export's size on disk next to the source's. It prints b/a and b/c per model and batch.

    .venv/bin/python tools/benchmark.py                      # everything (about 5 minutes)
    .venv/bin/python tools/benchmark.py --models shapes_cnn --batches 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
APPLICATIONS = {"resnet50": "ResNet50", "vgg16": "VGG16", "mobilenetv2": "MobileNetV2"}
MODELS = (*APPLICATIONS, "shapes_cnn")

# Runs `gbp-rewrite convert --json SRC DST --overwrite` as the console script does, and writes the
# process's own peak RSS (VmHWM) to the file argv[1] on the way out: the CLI ends with os._exit,
# which this wraps. (rusage's ru_maxrss of a child started with vfork/fork counts the parent's
# pages before exec: the benchmark's loaded models would be billed to it.)
_CONVERT_CHILD = r"""
import os, sys
peak_file, real_exit = sys.argv[1], os._exit

def exit_with_peak(status):
    hwm_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    with open(peak_file, "w") as f:
        f.write(str(hwm_kib))
    real_exit(status)

os._exit = exit_with_peak
sys.argv = ["gbp-rewrite", "convert", "--json", "--overwrite", *sys.argv[2:]]
from gbp_rewrite.cli import run
run()
"""


def build_source(name: str, workdir: Path) -> Path:
    """The source SavedModel for `name` (built once and kept in `workdir`)."""
    if name == "shapes_cnn":
        return REPO / "testdata" / "shapes_cnn"
    path = workdir / name
    if not (path / "saved_model.pb").exists():
        import keras

        model = getattr(keras.applications, APPLICATIONS[name])(weights=None, classifier_activation=None)
        model.export(str(path), verbose=False)
    return path


def convert_in_child(source: Path, destination: Path) -> dict:
    """Run the conversion command in a fresh process: its wall time, the conversion's own time
    (the report's, without Python start-up and the TensorFlow import), peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak_kib"
        started = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", _CONVERT_CHILD, str(peak_file), str(source), str(destination)],
                               capture_output=True, text=True)
        wall = time.perf_counter() - started
        if child.returncode != 0:
            raise SystemExit(f"conversion of {source} failed:\n{child.stderr[-2000:]}")
        peak_gib = int(peak_file.read_text()) / 2**20
    return {"wall_s": wall, "convert_s": json.loads(child.stdout)["seconds"], "peak_rss_gib": peak_gib}


def disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_functions(source: Path, export: Path):
    """The three functions (a), (b), (c) and the input spec they share."""
    import tensorflow as tf

    source_model = tf.saved_model.load(str(source))
    export_model = tf.saved_model.load(str(export))
    plain = source_model.signatures["serving_default"]
    explainable = export_model.signatures["serving_default"]
    (key, spec), = plain.structured_input_signature[1].items()
    (output_key,) = plain.structured_outputs

    @tf.function(input_signature=[spec])
    def input_gradient(x):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            y = plain(**{key: x})[output_key]
        top = tf.one_hot(tf.argmax(y, -1), tf.shape(y)[-1], dtype=y.dtype)
        return y, tape.gradient(y, x, output_gradients=top)

    functions = {
        "a": lambda x: plain(**{key: x}),
        "b": lambda x: explainable(**{key: x}),
        "c": input_gradient,
    }
    return functions, spec, (source_model, export_model)


# Rounds go on past --repeats until this many seconds were measured (a small model's call takes
# a millisecond, and a few rounds of it are at the mercy of one scheduler hiccup), up to MAX_ROUNDS.
MIN_SECONDS = 5.0
MAX_ROUNDS = 2000


def interleaved_medians(functions, x, *, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median time per function, and median of the per-round ratios b/a and b/c, over at least
    `repeats` rounds and at least MIN_SECONDS of measuring; "rounds" says how many there were.

    Each round calls every function once, back to back; a ratio taken within a round compares
    calls made under the same machine load, so its median is robust to the slow drifts of a shared
    machine that make a ratio of two medians wander.
    """
    import numpy as np
    import tensorflow as tf

    def call(fn):
        return [t.numpy() for t in tf.nest.flatten(fn(x))]  # wait for the result

    for _ in range(warmup):
        for fn in functions.values():
            call(fn)
    times = {name: [] for name in functions}
    measuring = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - measuring < MIN_SECONDS and rounds < MAX_ROUNDS):
        rounds += 1
        for name, fn in functions.items():
            started = time.perf_counter()
            call(fn)
            times[name].append(time.perf_counter() - started)
    result = {name: float(np.median(t)) for name, t in times.items()}
    b = np.array(times["b"])
    result["b/a"] = float(np.median(b / np.array(times["a"])))
    result["b/c"] = float(np.median(b / np.array(times["c"])))
    result["rounds"] = rounds
    return result


def measure(name: str, workdir: Path, batches: list[int], repeats: int) -> list[dict]:
    import numpy as np
    import tensorflow as tf

    source = build_source(name, workdir)
    export = workdir / f"{name}_explainable"
    conversion = convert_in_child(source, export)
    size_ratio = disk_size(export) / disk_size(source)
    functions, spec, _keep = timed_functions(source, export)
    rows = []
    for batch in batches:
        shape = [batch, *spec.shape[1:]]
        x = tf.constant(np.random.default_rng(0).uniform(0, 1, shape).astype(spec.dtype.as_numpy_dtype))
        medians = interleaved_medians(functions, x, repeats=repeats)
        rows.append({
            "model": name, "batch": batch, **{f"{k}_ms": medians[k] * 1000 for k in "abc"},
            "b/a": medians["b/a"], "b/c": medians["b/c"], "rounds": medians["rounds"],
            "size_ratio": size_ratio, **conversion,
        })
        print(_row_text(rows[-1]), flush=True)
    return rows


HEADER = (f"{'model':<12} {'batch':>5} {'rounds':>6} {'a ms':>8} {'b ms':>8} {'c ms':>8} {'b/a':>6} {'b/c':>6} "
          f"{'convert s':>9} {'(in-call)':>9} {'peak GiB':>8} {'size':>6}")


def _row_text(row: dict) -> str:
    return (f"{row['model']:<12} {row['batch']:>5} {row['rounds']:>6} {row['a_ms']:>8.1f} {row['b_ms']:>8.1f} {row['c_ms']:>8.1f} "
            f"{row['b/a']:>6.2f} {row['b/c']:>6.2f} {row['wall_s']:>9.1f} {row['convert_s']:>9.1f} "
            f"{row['peak_rss_gib']:>8.2f} {row['size_ratio']:>6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds at least (median; >= 5); rounds go on until "
                        f"{MIN_SECONDS:g} s were measured, at most {MAX_ROUNDS}")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gbp_rewrite_benchmark"),
                        help="where source models and exports are kept between runs")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or args.repeats < 5:
        parser.error(f"unknown models {unknown}; valid: {', '.join(MODELS)}" if unknown else "--repeats must be >= 5")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("# a = source signature, b = explainable signature, c = plain input gradient through the source;")
    print(f"# times: medians of >= {args.repeats} interleaved rounds (and >= {MIN_SECONDS:g} s of them); "
          "b/a, b/c: medians of the per-round ratios")
    print("# convert s = the whole `gbp-rewrite convert` command in a fresh process (in-call: the conversion "
          "alone, without Python start-up and the TensorFlow import); size = export/source bytes")
    print(HEADER, flush=True)
    rows = [row for name in models for row in measure(name, workdir, [int(b) for b in args.batches.split(",")], args.repeats)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
