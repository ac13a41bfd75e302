"""Benchmark: what --cam (gradcam + guided_gradcam) adds to the explainable signature.

For keras.applications ResNet50, VGG16 and MobileNetV2 (weights=None: no download) and the testdata
CNN, at batch 1 and 8, this converts each model twice (without and with --cam) and measures side by
side in one process, interleaved call by call (tools/benchmark.py's method: medians of >= --repeats
rounds and >= 5 s of them, ratios as medians of per-round ratios):

  (a) the explainable export's serving signature without --cam,
  (b) the same with --cam (one forward pass; the extra work is the head's true-gradient backward
      pass above the Grad-CAM layer and the map itself),
  (c) the plain input gradient through the source (the floor of any gradient explanation).

The target is b/a <= 1.10 for the three networks at both batch sizes.

    .venv/bin/python tools/benchmark_cam.py                  # everything (about 10 minutes)
    .venv/bin/python tools/benchmark_cam.py --models mobilenetv2 --batches 1
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark  # noqa: E402  (tools/benchmark.py: sources, interleaved timing)

HEADER = f"{'model':<12} {'batch':>5} {'rounds':>6} {'plain ms':>9} {'--cam ms':>9} {'grad ms':>8} {'cam/plain':>9} {'layer'}"


def measure(name: str, workdir: Path, batches: list[int], repeats: int) -> list[dict]:
    import numpy as np
    import tensorflow as tf

    import gbp_rewrite

    source = benchmark.build_source(name, workdir)
    plain_dir, cam_dir = workdir / f"{name}_explainable", workdir / f"{name}_explainable_cam"
    gbp_rewrite.convert(source, plain_dir, overwrite=True)
    report = gbp_rewrite.convert(source, cam_dir, overwrite=True, cam=True)
    functions, spec, keep = benchmark.timed_functions(source, plain_dir)
    cam_signature = tf.saved_model.load(str(cam_dir)).signatures["serving_default"]
    (key,) = cam_signature.structured_input_signature[1]
    timed = {"a": functions["b"], "b": lambda x: cam_signature(**{key: x}), "c": functions["c"]}
    rows = []
    for batch in batches:
        shape = [batch, *spec.shape[1:]]
        x = tf.constant(np.random.default_rng(0).uniform(0, 1, shape).astype(spec.dtype.as_numpy_dtype))
        medians = benchmark.interleaved_medians(timed, x, repeats=repeats)
        row = {"model": name, "batch": batch, "rounds": medians["rounds"], "plain_ms": medians["a"] * 1000,
               "cam_ms": medians["b"] * 1000, "gradient_ms": medians["c"] * 1000, "cam/plain": medians["b/a"],
               "layer": report.checks["grad-cam layer"]}
        rows.append(row)
        print(f"{name:<12} {batch:>5} {row['rounds']:>6} {row['plain_ms']:>9.1f} {row['cam_ms']:>9.1f} "
              f"{row['gradient_ms']:>8.1f} {row['cam/plain']:>9.3f} {row['layer']}", flush=True)
    del keep
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,vgg16,mobilenetv2,shapes_cnn")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--workdir", default=str(Path("/tmp") / "gbp_rewrite_benchmark"))
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(benchmark.MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; valid: {', '.join(benchmark.MODELS)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    for name in models:
        measure(name, workdir, [int(b) for b in args.batches.split(",")], args.repeats)


if __name__ == "__main__":
    main()
