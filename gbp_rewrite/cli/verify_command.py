"""`gbp-rewrite verify DIR [--source SRC] [--tflite FILE] [--onnx FILE]`: prove an export runs without gbp_rewrite, as TF Serving would."""

from __future__ import annotations

import argparse

from gbp_rewrite.cli import common
from gbp_rewrite.errors import VerificationError

NAME = "verify"
SUMMARY = ("Check that the SavedModel DIR runs where users deploy it: in a clean process without "
           "gbp_rewrite, run every signature on a probe batch (predictions equal --source's, saliency "
           "finite and not all zero, outputs keep the batch dimension), audit the op types (no Python "
           "or custom ops), and run TF Serving's C++ loader (built with g++ into ~/.cache/gbp_rewrite on "
           "first use, about a minute; GBP_REWRITE_SERVING_CHECK=none skips it). A model "
           "whose graph reaches files or the network is refused first unless --allow_file_ops. "
           "--tflite/--onnx: also run the files `convert --tflite/--onnx` wrote from DIR in LiteRT / "
           "onnxruntime on the same probe batch; every output must match DIR's as at conversion. One "
           "PASS/FAIL/SKIP line per check; exit status 1 if any check fails.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", metavar="DIR", help="the SavedModel directory to check.")
    parser.add_argument("--source", metavar="SRC", help="the source model (SavedModel directory or "
                        ".keras/.h5 file); each signature's predictions must equal the source's on the "
                        "same probe inputs.")
    parser.add_argument("--tflite", metavar="FILE", help="a .tflite file written from DIR (convert --tflite): "
                        "it must run in LiteRT and match DIR's outputs (extra 'tflite').")
    parser.add_argument("--onnx", metavar="FILE", help="an .onnx file written from DIR (convert --onnx): "
                        "it must run in onnxruntime and match DIR's outputs (extra 'onnx').")
    common.add_json(parser)
    common.add_allow_file_ops(parser)


def run(args: argparse.Namespace) -> None:
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.deploy.check import verify_export

    report = verify_export(args.export_dir, source=args.source, allow_file_ops=args.allow_file_ops,
                           tflite=args.tflite, onnx=args.onnx)
    common.emit(report, args)
    if not report.ok:
        raise VerificationError(report.failure_summary())
