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
           "also the overlays and the figures (captioned with the class, by name with --labels); "
           "`saliency_png*_bytes` outputs are written as the PNG files they are. With --grpc, RESPONSE "
           "is a serialised PredictResponse (gRPC).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("response", metavar="RESPONSE", help="the response JSON file (a PredictResponse file with --grpc), or - for stdin.")
    parser.add_argument("--out", metavar="DIR", help="the folder for the .npy files and PNGs.")
    common.add_image(parser, "the request's image file, for the overlays and figures.")
    common.add_labels(parser)
    common.add_bool(parser, "grpc", "RESPONSE is a serialised tensorflow.serving.PredictResponse (gRPC). "
                    "Needs the optional extra 'serving' (tensorflow-serving-api).")


def check_usage(args: argparse.Namespace) -> None:
    """The flag combinations (checked before TensorFlow is imported)."""
    if not args.out:
        raise common.UsageError("'decode' needs --out DIR, the folder for the arrays and pictures")


def run(args: argparse.Namespace) -> None:
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.serving.response_files import write_response_files
    from gbp_rewrite.pictures.labels import load_labels
    from gbp_rewrite.serving.rest import decode_response

    if args.grpc:
        from gbp_rewrite.serving import grpc_messages

        data = sys.stdin.buffer.read() if args.response == "-" else None
        arrays = (grpc_messages.decode_predict_response(data) if data is not None
                  else grpc_messages.read_predict_response(args.response))
    else:
        try:
            text = sys.stdin.read() if args.response == "-" else Path(args.response).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "not UTF-8 text (a gRPC PredictResponse? use --grpc)"
            raise RestFormatError(f"cannot read the response '{args.response}': {why}") from None
        arrays = decode_response(text)
    labels = load_labels(args.labels) if args.labels else None
    written = write_response_files(arrays, args.out, image_paths=common.split_paths(args.image), labels=labels)
    shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
    sys.stdout.write(f"decoded {shapes}\nwrote {len(written)} file(s) to {args.out}\n")
    for path in written:
        sys.stdout.write(f"  {path.name}\n")
