"""`gbp-rewrite explain MODEL (--image PATH ... | --dir FOLDER) --out OUTDIR`: saliency pictures."""

from __future__ import annotations

import sys

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS

NAME = "explain"
ARGS = ("MODEL",)
SUMMARY = ("Run an explainable MODEL (written by `convert`) on image files (--image or --dir) and write "
           "per image a heat map, an overlay and the guided-backprop picture as PNG (and the Grad-CAM "
           "pictures of an export converted with --cam), plus results.csv "
           "and summary.json, into --out. Exit status 1 if any image could not be explained.")
FLAG_NAMES = {"image", "dir", "out", "class", "preprocess", "batch_size", "grayscale_to_rgb", "allow_file_ops"}

flags.DEFINE_string("dir", None, "explain, sanity: a folder of images (its .png/.jpg/.jpeg/.bmp/.gif files; "
                    "other files are skipped and named).")
flags.DEFINE_integer("class", None, "explain: explain this class for every image (the `explain_class` "
                     "signature) instead of each image's top class.", lower_bound=0)
flags.DEFINE_integer("batch_size", 32, "explain: images per model call.", lower_bound=1)


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
            model, FLAGS.dir if FLAGS.dir else common.split_paths(FLAGS.image), out_dir=FLAGS.out,
            class_index=FLAGS["class"].value, preprocess=FLAGS.preprocess, batch_size=FLAGS.batch_size,
            grayscale_to_rgb=FLAGS.grayscale_to_rgb, progress=progress, allow_file_ops=FLAGS.allow_file_ops,
        )
    finally:
        progress.finish()
    sys.stdout.write(summary.to_text() + "\n")
    if summary.failed:
        raise ImageError(f"{len(summary.failed)} of {summary.total} image(s) could not be explained "
                         f"(listed above and in {summary.summary_json})")

