"""`gbp-rewrite convert SRC DST`: write an explainable copy of a model."""

from __future__ import annotations

import argparse

from gbp_rewrite.cli import common

NAME = "convert"
SUMMARY = ("Write an explainable copy of SRC (a SavedModel directory, or a .keras/.h5 Keras file) to DST: the signature returns the original outputs plus "
           "`saliency` (d score / d input, same shape and dtype as the input) and `explained_class`; "
           "a second signature `explain_class` takes a class per example.")


def _serving_version(text: str) -> str:
    if text == "next" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"takes a non-negative integer or 'next', not {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="a SavedModel directory or a .keras/.h5 file.")
    parser.add_argument("destination", metavar="DST", help="the directory to write (never half-written).")
    common.add_list(parser, "layers", "names or glob patterns of the layers whose ReLUs get the rule "
                    "(default: every ReLU), matched against the layer path inspect prints or any tail of it "
                    "(block_1*, model/block_1*). A nested model's name selects all its layers.", metavar="NAME")
    common.add_list(parser, "exclude_layers", "names or glob patterns of layers to leave alone.", metavar="NAME")
    parser.add_argument("--rule", default="guided", choices=("guided", "deconvnet", "vanilla"),
                        help="the gradient rule: guided (dy*[x>0]*[dy>0]), deconvnet (dy*[dy>0]) or "
                             "vanilla (the true gradient) (default: guided).")
    parser.add_argument("--smooth_activations", default="true", choices=("true", "guided"),
                        help="swish, GELU, mish, ELU, SELU, softplus, sigmoid, tanh, hard_sigmoid/hard_silu: "
                             "true keeps their true gradient (default); guided is this tool's EXTENSION of "
                             "guided backprop, not the published rule: dx = f'(x)*dy*[dy>0]. Needs --rule "
                             "guided.")
    common.add_signature(parser, "the signature to explain (default: serving_default).", default="serving_default")
    parser.add_argument("--output", metavar="KEY", help="the output to explain when the signature has several.")
    parser.add_argument("--score", default="logit", choices=("logit", "probability"),
                        help="what is explained: the logit before the output's Softmax/Sigmoid "
                             "(default; refused when arithmetic follows it) or the output's value (the "
                             "probability; 1 - p for a binary sigmoid's class 0). See docs/signatures.md, "
                             "'What is explained'.")
    common.add_bool(parser, "saliency_map", "also return `saliency_map`, [batch, H, W] float32: max "
                    "|saliency| over the channels, scaled per example to [0, 1], a ready heat map (image "
                    "inputs only).")
    common.add_bool(parser, "overwrite", "replace DST if it exists (otherwise it is left untouched).")
    parser.add_argument("--serving_version", type=_serving_version, metavar="N|next",
                        help="write TF Serving's layout: the export goes to DST/N, N a number or 'next' "
                             "(docs/deployment.md); the folder appears only when complete.")
    common.add_bool(parser, "fold_batchnorms", "fold inference BatchNorms into the convolution before "
                    "them (SavedModels): fewer passes over the activations; predictions equal to "
                    "float rounding, checked against the source; off keeps the source's arithmetic.", default=True)
    # Serving options (gbp_rewrite.serving.serving_signatures; docs/serving-in-production.md).
    common.add_bool(parser, "image_bytes_signature", "also write `serving_bytes`, `explain_class_bytes`: "
                    "encoded images in, decoded in the graph.")
    parser.add_argument("--preprocess", choices=common.PREPROCESS_MODES,
                        help="with --image_bytes_signature: the preprocessing done in the graph, as for "
                             "explain (default: unit).")
    parser.add_argument("--saliency_map_dtype", choices=("float32", "uint8"),
                        help="`saliency_map` as float32 in [0, 1] (default) or uint8 0..255; turns "
                             "--saliency_map on.")
    common.add_bool(parser, "saliency_png", "also return `saliency_png_bytes`, each example's heat map as a "
                    "PNG; turns --saliency_map on.")
    common.add_bool(parser, "portable", "build the signature, gradient included, from ops TFLite and ONNX "
                    "both have (SavedModels).")
    parser.add_argument("--tflite", metavar="FILE", help="also write this .tflite file, checked in LiteRT "
                        "(implies --portable; extra 'tflite').")
    parser.add_argument("--onnx", metavar="FILE", help="also write this .onnx file, checked in onnxruntime "
                        "(implies --portable; extra 'onnx').")
    common.add_bool(parser, "cam", "also return Grad-CAM: `gradcam`, `guided_gradcam`.")
    parser.add_argument("--cam_layer", metavar="NAME", help="Grad-CAM's layer (as for --layers); implies --cam.")
    common.add_json(parser)
    common.add_unsafe_deserialization(parser)
    common.add_allow_file_ops(parser)


def check_usage(args: argparse.Namespace) -> None:
    """The flag combinations (checked before TensorFlow is imported)."""
    if args.preprocess is not None and not args.image_bytes_signature:
        raise common.UsageError("'convert' takes --preprocess only with --image_bytes_signature (the "
                                "preprocessing done in the graph); without it clients send preprocessed pixels")


def run(args: argparse.Namespace) -> None:
    # Imported here, as in every command: --help and usage errors answer without loading TensorFlow.
    from gbp_rewrite.pipeline import convert

    report = convert(
        args.source, args.destination,
        layers=common.split_list(args.layers), exclude_layers=common.split_list(args.exclude_layers),
        rule=args.rule, signature=args.signature, output=args.output, score=args.score,
        overwrite=args.overwrite, saliency_map=args.saliency_map, version=args.serving_version,
        safe_mode=not args.unsafe_deserialization, allow_file_ops=args.allow_file_ops,
        fold_batchnorms=args.fold_batchnorms, image_bytes=args.image_bytes_signature,
        preprocess=args.preprocess or "unit", saliency_map_dtype=args.saliency_map_dtype,
        saliency_png=args.saliency_png,
        portable=args.portable, tflite=args.tflite, onnx=args.onnx,
        cam=args.cam, cam_layer=args.cam_layer, smooth_activations=args.smooth_activations,
    )
    common.emit(report, args)
