"""`gbp-rewrite convert SRC DST`: write an explainable copy of a model."""

from __future__ import annotations

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS

NAME = "convert"
ARGS = ("SRC", "DST")
SUMMARY = ("Write an explainable copy of SRC (a SavedModel directory, or a .keras/.h5 Keras file) to DST: the signature returns the original outputs plus "
           "`saliency` (d score / d input, same shape and dtype as the input) and `explained_class`; "
           "a second signature `explain_class` takes a class per example.")
FLAG_NAMES = {"layers", "exclude_layers", "rule", "signature", "output", "score", "overwrite", "json",
              "saliency_map", "serving_version", "unsafe_deserialization", "allow_file_ops",
              "fold_batchnorms", "image_bytes_signature", "preprocess", "saliency_map_dtype", "saliency_png"}

flags.DEFINE_list("layers", None, "convert: names or glob patterns of the layers whose ReLUs get the "
                  "rule (default: every ReLU). A nested model's name selects all its layers.")
flags.DEFINE_list("exclude_layers", None, "convert: names or glob patterns of layers to leave alone.")
flags.DEFINE_enum("rule", "guided", ("guided", "deconvnet", "vanilla"),
                  "convert: the gradient rule: guided (dy*[x>0]*[dy>0]), deconvnet (dy*[dy>0]) or "
                  "vanilla (the true gradient).")
flags.DEFINE_string("output", None, "convert: the output to explain when the signature has several.")
flags.DEFINE_enum("score", "logit", ("logit", "probability"),
                  "convert: what is explained for the top class: the pre-softmax logit (default) or "
                  "the softmax probability.")
flags.DEFINE_bool("saliency_map", False,
                  "convert: also return `saliency_map`, [batch, H, W] float32: max |saliency| over the "
                  "channels, scaled per example to [0, 1], a ready heat map (image inputs only).")
flags.DEFINE_bool("overwrite", False, "convert: replace DST if it exists (otherwise it is left untouched).")
flags.DEFINE_string("serving_version", None, "convert: write TF Serving's layout: DST is the model's "
                    "base path and the export goes to DST/N, N a number or 'next' (one more than the "
                    "highest version in DST, 1 when there is none); the folder appears only when complete.")
flags.DEFINE_bool("fold_batchnorms", True, "convert: fold inference BatchNorms into the convolution "
                  "before them in the explainable graph (SavedModels): fewer passes over the activations, "
                  "forward and backward; predictions equal to float rounding, checked against the source. "
                  "--nofold_batchnorms keeps the source's arithmetic exactly.")
# Serving options (gbp_rewrite.serving_bytes); --preprocess is common's (explain, request).
flags.DEFINE_bool("image_bytes_signature", False, "convert: also write `serving_bytes` and "
                  "`explain_class_bytes`, which take encoded images (`image_bytes`, string [batch]: JPEG, "
                  "PNG, BMP, GIF; {\"b64\": ...} in TF Serving's JSON), decode, resize and preprocess them "
                  "in the graph as `explain` does (--preprocess), and also return `image_size` [batch, 2].")
flags.DEFINE_enum("saliency_map_dtype", None, ("float32", "uint8"), "convert: the dtype of `saliency_map`: "
                  "float32 in [0, 1] (default) or uint8 in 0..255, 4x fewer bytes; turns --saliency_map on.")
flags.DEFINE_bool("saliency_png", False, "convert: also return `saliency_png_bytes`, each example's heat map "
                  "as a PNG string (the picture `explain` writes as <name>_heatmap.png); turns --saliency_map on.")
flags.register_validator("serving_version", lambda v: v is None or v == "next" or v.isdigit(),
                         message="--serving_version takes a non-negative integer or 'next'")


def run(source: str, destination: str) -> None:
    from gbp_rewrite.cli import UsageError
    from gbp_rewrite.converter import convert

    if FLAGS["preprocess"].present and not FLAGS.image_bytes_signature:
        raise UsageError("'convert' takes --preprocess only with --image_bytes_signature (the preprocessing "
                         "done in the graph); without it clients send preprocessed pixels")

    report = convert(
        source, destination,
        layers=FLAGS.layers, exclude_layers=FLAGS.exclude_layers, rule=FLAGS.rule,
        signature=FLAGS.signature, output=FLAGS.output, score=FLAGS.score, overwrite=FLAGS.overwrite,
        saliency_map=FLAGS.saliency_map, version=FLAGS.serving_version,
        safe_mode=not FLAGS.unsafe_deserialization, allow_file_ops=FLAGS.allow_file_ops,
        fold_batchnorms=FLAGS.fold_batchnorms, image_bytes=FLAGS.image_bytes_signature,
        preprocess=FLAGS.preprocess, saliency_map_dtype=FLAGS.saliency_map_dtype,
        saliency_png=FLAGS.saliency_png,
    )
    common.emit(report)
