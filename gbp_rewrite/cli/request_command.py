"""`gbp-rewrite request DIR --image PATH ...`: the body of a TF Serving REST predict request."""

from __future__ import annotations

import argparse
import sys

from gbp_rewrite.cli import common

NAME = "request"
SUMMARY = ("Write the JSON body of a TF Serving REST predict request (row format: "
           '{"signature_name": ..., "instances": [{<input>: pixels}, ...]}) for image files (--image), '
           "decoded, resized to the signature's input size and preprocessed as by `explain`, to --out "
           "(default: stdout).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="the SavedModel directory the server serves.")
    common.add_image(parser, "an image file (PNG, JPEG, BMP, GIF).")
    common.add_signature(parser, "the signature to call (default: serving_default; explain_class with "
                         "--class).", default=None)
    parser.add_argument("--class", dest="class_index", type=common.integer_at_least(0), metavar="N",
                        help="explain class N in every image: the body calls the explain_class signature "
                             "of an explainable export, each instance with \"class_index\": N.")
    common.add_preprocess(parser)
    parser.add_argument("--out", metavar="FILE", help="the file for the JSON body (default: stdout).")
    common.add_grayscale_to_rgb(parser)


def run(args: argparse.Namespace) -> None:
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.serving import rest
    from gbp_rewrite.serving.request import make_request, write_request

    if not args.image:
        raise common.UsageError("'request' needs at least one --image PATH")
    body = make_request(args.model, common.split_paths(args.image), signature=args.signature,
                        class_index=args.class_index, preprocess=args.preprocess,
                        grayscale_to_rgb=args.grayscale_to_rgb)
    if args.out:
        path = write_request(body, args.out)
        sys.stderr.write(f"wrote {path}: {len(body['instances'])} instance(s) for signature "
                         f"{body['signature_name']!r} (preprocessing {args.preprocess})\n")
    else:
        sys.stdout.write(rest.dumps(body) + "\n")
