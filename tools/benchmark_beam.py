"""Benchmark: images/s of `explain` in one process against the Beam pipeline on DirectRunner.

For the testdata CNN (32x32) and keras.applications ResNet50 (224x224, weights=None: no download),
converted with gbp-rewrite, on a folder of generated pictures (tools/shapes.py, fixed seed, PNG at
the model's input size), this runs as a user would, each a fresh process, wall time from start
to exit (model loading and worker start-up included):

  single   gbp-rewrite explain MODEL --dir IMAGES --out OUT
  beam x1  gbp-rewrite explain MODEL --glob 'IMAGES/*' --out OUT --runner DirectRunner
             -- --direct_num_workers 1 --direct_running_mode multi_processing
  beam x2  the same with --direct_num_workers 2

and prints a Markdown table (images/s, and each run's ratio to single). The machine is shared:
run it on an idle one for figures worth quoting; --repeat takes the best of several runs.

    .venv/bin/python tools/benchmark_beam.py                       # 2,000 images per model (long)
    .venv/bin/python tools/benchmark_beam.py --images 2000 --resnet_images 48   # docs/beam.md's run
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "single": [],
    "beam x1": ["--runner", "DirectRunner", "--", "--direct_num_workers", "1", "--direct_running_mode", "multi_processing"],
    "beam x2": ["--runner", "DirectRunner", "--", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "gbp_rewrite.cli", *map(str, args)]


def explainable_model(name: str, workdir: Path) -> Path:
    """The converted model (built and converted once, kept in `workdir`)."""
    converted = workdir / f"{name}_explainable"
    if converted.exists():
        return converted
    source = REPO / "testdata" / "shapes_cnn"
    if name == "resnet50":
        source = workdir / "resnet50"
        if not source.exists():
            import keras

            keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3)).export(str(source), verbose=False)
    subprocess.run(cli("convert", source, converted, "--overwrite"), check=True, stdout=subprocess.DEVNULL)
    return converted


def image_folder(workdir: Path, count: int, size: int) -> Path:
    """`count` generated PNGs of `size` x `size` (made once per count and size)."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(REPO / "tools"))
    import shapes

    folder = workdir / f"images_{size}_{count}"
    if folder.exists() and len(list(folder.iterdir())) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    chunk = 250
    for start in range(0, count, chunk):
        pictures, _, _ = shapes.make_dataset(min(chunk, count - start), seed=start)
        for n, picture in enumerate(pictures):
            if size != picture.shape[0]:
                picture = tf.image.resize(picture, (size, size), method="bilinear").numpy().round().astype(np.uint8)
            (folder / f"img_{start + n:06d}.png").write_bytes(tf.io.encode_png(picture).numpy())
    return folder


def timed(model: Path, images: Path, out: Path, run: list[str], batch_size: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    where = ["--dir", images] if not run else ["--glob", f"{images}/*"]
    argv = cli("explain", model, *where, "--out", out, "--batch_size", batch_size, *run)
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, argv))}\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapes_cnn,resnet50", help="comma-separated: shapes_cnn, resnet50")
    parser.add_argument("--images", type=int, default=2000, help="images for the CNN (and ResNet50 unless "
                        "--resnet_images)")
    parser.add_argument("--resnet_images", type=int, default=None, help="images for ResNet50 (it explains "
                        "about 1 image/s per core: keep the run bounded)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration; the best is kept")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gbp_rewrite_benchmark_beam")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        count = args.resnet_images if name == "resnet50" and args.resnet_images else args.images
        size = 224 if name == "resnet50" else 32
        model = explainable_model(name, args.workdir)
        images = image_folder(args.workdir, count, size)
        seconds = {}
        for label, run in RUNS.items():
            seconds[label] = min(timed(model, images, args.workdir / "out", run, args.batch_size)
                                 for _ in range(args.repeat))
            print(f"{name} {label}: {count} images in {seconds[label]:.1f} s", file=sys.stderr, flush=True)
        rows.append((name, size, count, seconds))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; batch size {args.batch_size}\n")
    print("| model | input | images | " + " | ".join(f"{label} (images/s)" for label in RUNS) + " | x2 / single |")
    print("|---|---|---|" + "---|" * len(RUNS) + "---|")
    for name, size, count, seconds in rows:
        rates = {label: count / s for label, s in seconds.items()}
        print(f"| {name} | {size}x{size} | {count} | " + " | ".join(f"{rates[label]:.3g}" for label in RUNS)
              + f" | {rates['beam x2'] / rates['single']:.2f}x |")


if __name__ == "__main__":
    main()
