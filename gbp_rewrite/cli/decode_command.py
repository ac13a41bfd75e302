"""`gbp-rewrite decode RESPONSE.json --out DIR`: a TF Serving REST response back to arrays and PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gbp_rewrite.cli import common
from gbp_rewrite.errors import RestFormatError

NAME = "decode"
SUMMARY = ("Turn a TF Serving REST predict response (RESPONSE is a JSON file, or - for stdin; row "
           "format 'predictions' or columnar 'outputs') into one .npy per output and, per example, the "
           "saliency heat map and guided picture as PNG in --out; with the request's --image files "
           "also the overlays and the figures (captioned with the class, by name with --labels).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("response", metavar="RESPONSE", help="the response JSON file, or - for stdin.")
    parser.add_argument("--out", metavar="DIR", help="the folder for the .npy files and PNGs.")
    common.add_image(parser, "the request's image file, for the overlays and figures.")
    common.add_labels(parser)


def run(args: argparse.Namespace) -> None:
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.serving.response_files import write_response_files
    from gbp_rewrite.pictures.labels import load_labels
    from gbp_rewrite.serving.rest import decode_response

    if not args.out:
        raise common.UsageError("'decode' needs --out DIR, the folder for the arrays and pictures")
    try:
        text = sys.stdin.read() if args.response == "-" else Path(args.response).read_text(encoding="utf-8")
    except OSError as e:
        raise RestFormatError(f"cannot read the response '{args.response}': {e.strerror}") from None
    labels = load_labels(args.labels) if args.labels else None
    arrays = decode_response(text)
    written = write_response_files(arrays, args.out, image_paths=common.split_paths(args.image), labels=labels)
    shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
    sys.stdout.write(f"decoded {shapes}\nwrote {len(written)} file(s) to {args.out}\n")
    for path in written:
        sys.stdout.write(f"  {path.name}\n")
