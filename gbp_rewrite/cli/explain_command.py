"""`gbp-rewrite explain MODEL (--image PATH ... | --dir FOLDER) --out OUTDIR`: saliency pictures.

With `--runner NAME --glob PATTERN [-- beam options]` the same runs as an Apache Beam pipeline
(gbp_rewrite/cli/beam_explain.py, which imports apache-beam only then)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gbp_rewrite.cli import common
from gbp_rewrite.cli.progress import Progress
from gbp_rewrite.errors import ImageError

NAME = "explain"
SUMMARY = ("Run an explainable MODEL (written by `convert`) on image files (--image or --dir) and write "
           "per image <stem>_figure.png (the image, the overlay and the guided-backprop picture side by "
           "side, with the class and score: look at it first), the heat map, overlay and guided picture "
           "as PNG (and the Grad-CAM pictures of an export converted with --cam), plus results.csv and "
           "summary.json, into --out. Exit status 1 if any image could not be explained. With --runner: "
           "the same as an Apache Beam pipeline over the files of --glob (sharded results-*.csv/.jsonl).")
TAKES_PASSTHROUGH = True  # Beam's pipeline options after `--` (with --runner)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an explainable SavedModel directory (from convert).")
    common.add_image(parser, "an image file (PNG, JPEG, BMP, GIF).")
    parser.add_argument("--dir", metavar="FOLDER", help="a folder of images (its .png/.jpg/.jpeg/.bmp/.gif "
                        "files; other files are skipped and named).")
    common.add_bool(parser, "recursive", "with --dir, take the images of its subfolders too.")
    parser.add_argument("--out", metavar="OUTDIR", help="the folder for the PNGs, results.csv and "
                        "summary.json (created if missing; the pictures an earlier run listed in its "
                        "summary.json there are removed first, nothing else).")
    parser.add_argument("--class", dest="class_index", type=common.integer_at_least(0), metavar="N",
                        help="explain this class for every image (the `explain_class` signature) instead "
                             "of each image's top class.")
    parser.add_argument("--top_k", type=common.integer_at_least(1), default=1, metavar="K",
                        help="explain each image's K best classes (<stem>_top1_*, <stem>_top2_*, ...; "
                             "default: 1, the top class).")
    common.add_labels(parser)
    common.add_drawing(parser)
    common.add_preprocess(parser)
    parser.add_argument("--batch_size", type=common.integer_at_least(1), default=32, metavar="N",
                        help="images per model call (default: 32).")
    common.add_grayscale_to_rgb(parser)
    common.add_allow_file_ops(parser)
    _add_beam_arguments(parser)


def _add_beam_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runner", metavar="NAME", help="run as an Apache Beam pipeline on this runner "
                        "(DirectRunner, DataflowRunner, ...) over the files of --glob; Beam's options follow a "
                        "`--`. Writes sharded results-*.csv/.jsonl instead of results.csv/summary.json. Needs: "
                        "pip install -e '.[beam]'.")
    parser.add_argument("--glob", action="append", metavar="PATTERN", help="with --runner: a file pattern of "
                        "images (local, gs://, s3://: anything Beam's FileSystems reads); repeat the flag for more.")
    parser.add_argument("--saliency_format", choices=["parquet"], help="with --runner: also write the raw "
                        "saliency arrays (saliency-*.parquet: file, class, score, shape, saliency).")


def _is_beam(args: argparse.Namespace) -> bool:
    return bool(args.runner or args.glob or args.saliency_format or args.passthrough)


def check_usage(args: argparse.Namespace) -> None:
    """The flag combinations (checked before TensorFlow is imported)."""
    if _is_beam(args):
        from gbp_rewrite.cli import beam_explain  # no apache-beam import: that is in its run()

        return beam_explain.check_usage(args)
    if args.recursive and not args.dir:
        raise common.UsageError("--recursive goes with --dir FOLDER")
    common.require_one_image_source(args, "explain")
    if not args.out:
        raise common.UsageError("'explain' needs --out OUTDIR, the folder for the pictures")


def run(args: argparse.Namespace) -> None:
    if _is_beam(args):
        from gbp_rewrite.cli import beam_explain  # apache-beam only when asked for

        return beam_explain.run(args)
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.pictures.explainer import explain

    if args.dir and not Path(args.dir).is_dir():  # refused before the model is loaded
        what = "is not a folder" if Path(args.dir).exists() else "does not exist"
        raise ImageError(f"--dir '{args.dir}' {what}; pass a folder of images, or image files with --image")
    progress = Progress("explain", "images")
    try:
        summary = explain(
            args.model, args.dir if args.dir else common.split_paths(args.image), out_dir=args.out,
            class_index=args.class_index, top_k=args.top_k, labels=args.labels, preprocess=args.preprocess,
            batch_size=args.batch_size, grayscale_to_rgb=args.grayscale_to_rgb, recursive=args.recursive,
            colormap=args.colormap, alpha=args.alpha, clip_percentile=args.clip_percentile, sign=args.sign,
            progress=progress, allow_file_ops=args.allow_file_ops,
        )
    finally:
        progress.finish()
    sys.stdout.write(summary.to_text() + "\n")
    if summary.failed:
        raise ImageError(f"{len(summary.failed)} of {summary.total} image(s) could not be explained "
                         f"(listed above and in {summary.summary_json})")
