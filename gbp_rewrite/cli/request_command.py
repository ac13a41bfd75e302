"""`gbp-rewrite request DIR --image PATH ...`: the body of a TF Serving REST (or gRPC) predict request."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gbp_rewrite.cli import common

NAME = "request"
SUMMARY = ("Write the JSON body of a TF Serving REST predict request (row format: "
           '{"signature_name": ..., "instances": [{<input>: pixels}, ...]}) for image files (--image), '
           "decoded, resized to the signature's input size and preprocessed as by `explain`, to --out "
           "(default: stdout); for an image-bytes signature (--signature serving_bytes) the files' own "
           'bytes as {"b64": ...}. With --grpc, a serialised PredictRequest instead (--out required).')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="the SavedModel directory the server serves.")
    common.add_image(parser, "an image file (PNG, JPEG, BMP, GIF).")
    common.add_signature(parser, "the signature to call (default: serving_default; explain_class with "
                         "--class).", default=None)
    parser.add_argument("--class", dest="class_index", type=common.integer_at_least(0), metavar="N",
                        help="explain class N in every image: the body calls the explain_class signature "
                             "of an explainable export, each instance with \"class_index\": N.")
    common.add_preprocess(parser)
    parser.add_argument("--out", metavar="FILE", help="the file for the JSON body (default: stdout), or "
                        "for the PredictRequest with --grpc.")
    common.add_grayscale_to_rgb(parser)
    common.add_bool(parser, "grpc", "write a serialised tensorflow.serving.PredictRequest (gRPC) to --out "
                    "instead of the REST JSON body. Needs the optional extra 'serving' (tensorflow-serving-api).")
    parser.add_argument("--model_name", metavar="NAME", help="with --grpc: the model name in the request's "
                        "model_spec (default: DIR's folder name, or its parent's when DIR is a numbered version).")


def default_model_name(model: str) -> str:
    path = Path(model).resolve()
    return path.parent.name if path.name.isdigit() else path.name


def check_usage(args: argparse.Namespace) -> None:
    """The flag combinations (checked before TensorFlow is imported)."""
    if not args.image:
        raise common.UsageError("'request' needs at least one --image PATH")
    if args.grpc and not args.out:
        raise common.UsageError("'request --grpc' writes a binary PredictRequest: give the file with --out")


def run(args: argparse.Namespace) -> None:
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.serving import rest
    from gbp_rewrite.serving.request import make_inputs, request_signature, write_request

    signature = request_signature(args.signature, args.class_index)
    inputs = make_inputs(args.model, common.split_paths(args.image), signature=signature,
                         class_index=args.class_index, preprocess=args.preprocess,
                         grayscale_to_rgb=args.grayscale_to_rgb)
    count = len(next(iter(inputs.values())))
    if args.grpc:
        from gbp_rewrite.serving import grpc_messages

        name = args.model_name or default_model_name(args.model)
        message = grpc_messages.predict_request(inputs, model_name=name, signature_name=signature)
        path = grpc_messages.write_message(message, args.out)
        sys.stderr.write(f"wrote {path}: PredictRequest for model {name!r}, signature {signature!r}, "
                         f"{count} example(s) ({message.ByteSize()} bytes)\n")
        return
    body = rest.request_body(inputs, signature_name=signature)
    if args.out:
        path = write_request(body, args.out)
        sys.stderr.write(f"wrote {path}: {count} instance(s) for signature "
                         f"{body['signature_name']!r} (preprocessing {args.preprocess})\n")
    else:
        sys.stdout.write(rest.dumps(body) + "\n")
