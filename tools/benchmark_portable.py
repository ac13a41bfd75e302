"""Benchmark of the portable exports: one explanation (prediction + saliency + class) in

  (r) TensorFlow, the regular explainable export (TensorFlow's own gradient kernels),
  (p) TensorFlow, the portable export (`convert --portable`: forward ops only),
  (t) LiteRT (ai_edge_litert, XNNPACK on by default), the .tflite file,
  (o) onnxruntime (CPU), the .onnx file,

side by side in one process, interleaved call by call (the machine is shared and noisy), at batch 1
and 8; times are medians in ms, plus the files' sizes next to the float weights'. Needs the tflite
and onnx extras.

    .venv/bin/python tools/benchmark_portable.py                       # shapes_cnn and mobilenetv2
    .venv/bin/python tools/benchmark_portable.py --models shapes_cnn --rounds 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
APPLICATIONS = {"resnet50": ("ResNet50", 96), "mobilenetv2": ("MobileNetV2", 96), "vgg16": ("VGG16", 96)}


def build_source(name: str, workdir: Path) -> tuple[Path, int]:
    if name == "shapes_cnn":
        return REPO / "testdata" / "shapes_cnn", 32
    import keras

    cls, size = APPLICATIONS[name]
    path = workdir / name
    keras.utils.set_random_seed(0)
    getattr(keras.applications, cls)(weights=None, input_shape=(size, size, 3), classifier_activation=None).export(
        str(path), verbose=False)
    return path, size


def runners(source: Path, workdir: Path):
    """{column: (call(x) -> None)} and the sizes, after converting `source` both ways."""
    import tensorflow as tf

    import gbp_rewrite

    regular, portable = workdir / "regular", workdir / "portable"
    tflite, onnx = workdir / "m.tflite", workdir / "m.onnx"
    gbp_rewrite.convert(source, regular, overwrite=True)
    gbp_rewrite.convert(source, portable, overwrite=True, tflite=tflite, onnx=onnx)
    signature = tf.saved_model.load(str(regular)).signatures["serving_default"]
    (key,) = signature.structured_input_signature[1]
    portable_signature = tf.saved_model.load(str(portable)).signatures["serving_default"]

    from ai_edge_litert.interpreter import Interpreter
    import onnxruntime

    interpreter = Interpreter(model_path=str(tflite))
    lite = interpreter.get_signature_runner("serving_default")
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    calls = {
        "TF regular": lambda x: signature(**{key: tf.constant(x)})["saliency"].numpy(),
        "TF portable": lambda x: portable_signature(**{key: tf.constant(x)})["saliency"].numpy(),
        "LiteRT": lambda x: lite(**{key: x})["saliency"],
        "onnxruntime": lambda x: session.run(["saliency"], {key: x})[0],
    }
    weights = sum(f.stat().st_size for f in (regular / "variables").iterdir())
    sizes = {"tflite": tflite.stat().st_size / weights, "onnx": onnx.stat().st_size / weights}
    return calls, sizes


def measure(calls, x, rounds: int) -> dict[str, float]:
    for call in calls.values():  # warm-up (and LiteRT's resize to this batch)
        call(x), call(x)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call(x)
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shapes_cnn,mobilenetv2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    import numpy as np

    print("| model | batch | TF regular ms | TF portable ms | LiteRT ms | onnxruntime ms | .tflite / weights | .onnx / weights |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            source, size = build_source(name, Path(tmp))
            calls, sizes = runners(source, Path(tmp))
            for batch in (int(b) for b in args.batches.split(",")):
                x = np.random.default_rng(0).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
                t = measure(calls, x, args.rounds)
                print(f"| {name} ({size}x{size}) | {batch} | {t['TF regular']:.1f} | {t['TF portable']:.1f} | "
                      f"{t['LiteRT']:.1f} | {t['onnxruntime']:.1f} | {sizes['tflite']:.2f} | {sizes['onnx']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
