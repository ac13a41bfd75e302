"""`gbp-rewrite explain MODEL (--image PATH ... | --dir FOLDER) --out OUTDIR`: saliency pictures."""

from __future__ import annotations

import argparse
import sys

from gbp_rewrite.cli import common
from gbp_rewrite.cli.progress import Progress
from gbp_rewrite.errors import ImageError

NAME = "explain"
SUMMARY = ("Run an explainable MODEL (written by `convert`) on image files (--image or --dir) and write "
           "per image a heat map, an overlay and the guided-backprop picture as PNG (and the Grad-CAM "
           "pictures of an export converted with --cam), plus results.csv "
           "and summary.json, into --out. Exit status 1 if any image could not be explained.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an explainable SavedModel directory (from convert).")
    common.add_image(parser, "an image file (PNG, JPEG, BMP, GIF).")
    parser.add_argument("--dir", metavar="FOLDER", help="a folder of images (its .png/.jpg/.jpeg/.bmp/.gif "
                        "files; other files are skipped and named).")
    parser.add_argument("--out", metavar="OUTDIR", help="the folder for the PNGs, results.csv and "
                        "summary.json (created if missing; files of the same names are replaced).")
    parser.add_argument("--class", dest="class_index", type=common.integer_at_least(0), metavar="N",
                        help="explain this class for every image (the `explain_class` signature) instead "
                             "of each image's top class.")
    common.add_preprocess(parser)
    parser.add_argument("--batch_size", type=common.integer_at_least(1), default=32, metavar="N",
                        help="images per model call (default: 32).")
    common.add_grayscale_to_rgb(parser)
    common.add_allow_file_ops(parser)


def run(args: argparse.Namespace) -> None:
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.pictures.explainer import explain

    if bool(args.image) == bool(args.dir):
        raise common.UsageError("'explain' takes the images with either --image or --dir (one of them)")
    if not args.out:
        raise common.UsageError("'explain' needs --out OUTDIR, the folder for the pictures")
    progress = Progress("explain", "images")
    try:
        summary = explain(
            args.model, args.dir if args.dir else common.split_paths(args.image), out_dir=args.out,
            class_index=args.class_index, preprocess=args.preprocess, batch_size=args.batch_size,
            grayscale_to_rgb=args.grayscale_to_rgb, progress=progress, allow_file_ops=args.allow_file_ops,
        )
    finally:
        progress.finish()
    sys.stdout.write(summary.to_text() + "\n")
    if summary.failed:
        raise ImageError(f"{len(summary.failed)} of {summary.total} image(s) could not be explained "
                         f"(listed above and in {summary.summary_json})")
