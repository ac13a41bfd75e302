"""`gbp-rewrite inspect MODEL`: signatures, inputs, outputs and ReLU-family sites by layer."""

from __future__ import annotations

import argparse

from gbp_rewrite.cli import common

NAME = "inspect"
SUMMARY = ("List a model's signatures (inputs, outputs) and its ReLU-family ops by layer (a SavedModel "
           "directory, or a .keras/.h5 Keras file as model.export would serve it).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a SavedModel directory or a .keras/.h5 file.")
    common.add_signature(parser, "the signature whose ReLU sites are listed (default: serving_default "
                         "when the model has it, else the first).", default=None)
    common.add_json(parser)
    common.add_unsafe_deserialization(parser)


def run(args: argparse.Namespace) -> None:
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.inspection import inspect

    info = inspect(args.model, signature=args.signature, safe_mode=not args.unsafe_deserialization)
    common.emit(info, args)
