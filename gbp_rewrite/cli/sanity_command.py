"""`gbp-rewrite sanity MODEL --dir IMAGES --out DIR`: do the explanations depend on what the model learned?"""

from __future__ import annotations

import argparse
import sys

from gbp_rewrite.cli import common

NAME = "sanity"
SUMMARY = ("Sanity checks (Adebayo et al. 2018) of a Keras MODEL (.keras/.h5) on the images of --dir: "
           "cascading weight randomisation from the output down and a class swap, comparing guided "
           "saliency, Grad-CAM, Guided Grad-CAM and the plain gradient (Spearman, SSIM); writes "
           "sanity.txt, sanity.json and sanity.png into --out and prints the table and a verdict per map.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a Keras model file (.keras/.h5).")
    common.add_image(parser, "an image file (PNG, JPEG, BMP, GIF).")
    parser.add_argument("--dir", metavar="FOLDER", help="a folder of images.")
    parser.add_argument("--out", metavar="DIR", help="the folder for sanity.txt, sanity.json and sanity.png.")
    parser.add_argument("--layers_to_randomize", type=common.integer_at_least(1), metavar="N",
                        help="how many layers with weights the cascade randomises, from the output down "
                             "(default: all).")
    parser.add_argument("--max_images", type=common.integer_at_least(1), default=8, metavar="N",
                        help="at most this many images (the first by name); each step rebuilds the "
                             "explanation (default: 8).")
    common.add_preprocess(parser)
    parser.add_argument("--cam_layer", metavar="NAME", help="the layer Grad-CAM uses (default: the last 4-D "
                        "[batch, h, w, c] output with h, w > 1).")
    common.add_unsafe_deserialization(parser)
    common.add_json(parser)


def check_usage(args: argparse.Namespace) -> None:
    """The flag combinations (checked before TensorFlow is imported)."""
    common.require_one_image_source(args, "sanity")
    if not args.out:
        raise common.UsageError("'sanity' needs --out DIR, the folder for sanity.txt, sanity.json and sanity.png")


def run(args: argparse.Namespace) -> None:
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.sanity_checks.run import sanity

    result = sanity(
        args.model, args.dir if args.dir else common.split_paths(args.image), out_dir=args.out,
        layers_to_randomize=args.layers_to_randomize, max_images=args.max_images,
        preprocess=args.preprocess, cam_layer=args.cam_layer, safe_mode=not args.unsafe_deserialization,
    )
    common.emit(result, args)
    if not args.json:
        sys.stdout.write(f"written: {', '.join(result.files.values())}\n")
