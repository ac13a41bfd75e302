"""`gbp-rewrite explain MODEL (--image PATH ... | --dir FOLDER) --out OUTDIR`: saliency pictures."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

FLAGS = flags.FLAGS

NAME = "explain"
ARGS = ("MODEL",)
SUMMARY = ("Run an explainable MODEL (written by `convert`) on image files (--image or --dir) and write "
           "per image a heat map, an overlay and the guided-backprop picture as PNG, plus results.csv "
           "and summary.json, into --out. Exit status 1 if any image could not be explained.")
FLAG_NAMES = {"image", "dir", "out", "class", "preprocess", "batch_size", "grayscale_to_rgb"}

flags.DEFINE_multi_string("image", None, "explain, request, decode: an image file (PNG, JPEG, BMP, GIF); "
                          "repeat the flag or give a comma-separated list.")
flags.DEFINE_string("dir", None, "explain: a folder of images (its .png/.jpg/.jpeg/.bmp/.gif files; "
                    "other files are skipped and named).")
flags.DEFINE_string("out", None, "explain: the folder for the PNGs, results.csv and summary.json "
                    "(created if missing; files of the same names are replaced). request: the file for "
                    "the JSON body (default: stdout). decode: the folder for the .npy files and PNGs.")
flags.DEFINE_integer("class", None, "explain: explain this class for every image (the `explain_class` "
                     "signature) instead of each image's top class.", lower_bound=0)
flags.DEFINE_enum("preprocess", "unit", ("unit", "symmetric", "caffe", "none"),
                  "explain, request: how the model expects its pixels, as in Keras applications: unit = x/255, "
                  "symmetric = x/127.5-1, caffe = RGB->BGR minus ImageNet means, none = raw 0..255.")
flags.DEFINE_integer("batch_size", 32, "explain: images per model call.", lower_bound=1)
flags.DEFINE_bool("grayscale_to_rgb", False, "explain, request: take grey-scale images as RGB (repeat the "
                  "grey channel); without it they are refused.")


def run(model: str) -> None:
    from gbp_rewrite.cli import UsageError
    from gbp_rewrite.cli.progress import Progress
    from gbp_rewrite.errors import ImageError
    from gbp_rewrite.explainer import explain

    if bool(FLAGS.image) == bool(FLAGS.dir):
        raise UsageError("'explain' takes the images with either --image or --dir (one of them)")
    if not FLAGS.out:
        raise UsageError("'explain' needs --out OUTDIR, the folder for the pictures")
    progress = Progress("explain", "images")
    try:
        summary = explain(
            model, FLAGS.dir if FLAGS.dir else _image_paths(FLAGS.image), out_dir=FLAGS.out,
            class_index=FLAGS["class"].value, preprocess=FLAGS.preprocess, batch_size=FLAGS.batch_size,
            grayscale_to_rgb=FLAGS.grayscale_to_rgb, progress=progress,
        )
    finally:
        progress.finish()
    sys.stdout.write(summary.to_text() + "\n")
    if summary.failed:
        raise ImageError(f"{len(summary.failed)} of {summary.total} image(s) could not be explained "
                         f"(listed above and in {summary.summary_json})")


def _image_paths(values: list[str]) -> list[str]:
    """Each --image value is a path, or a comma-separated list of paths (an existing path wins)."""
    paths = []
    for value in values:
        paths.extend([value] if Path(value).exists() else [p for p in value.split(",") if p])
    return paths
