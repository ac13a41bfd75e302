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
              "fold_batchnorms", "cam", "cam_layer"}

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
flags.DEFINE_bool("cam", False, "convert: also return `gradcam` ([batch, H, W] float32: Grad-CAM of the "
                  "explained class at the last 4-D layer output, from the true gradient, scaled per "
                  "example to [0, 1]) and `guided_gradcam` (the saliency times gradcam; class-sensitive). "
                  "Image inputs only.")
flags.DEFINE_string("cam_layer", None, "convert, sanity: the layer Grad-CAM uses (a name, nested model, path or "
                    "glob, as for --layers; default: the last 4-D [batch, h, w, c] output with h, w > 1). "
                    "Implies --cam.")
flags.register_validator("serving_version", lambda v: v is None or v == "next" or v.isdigit(),
                         message="--serving_version takes a non-negative integer or 'next'")


def run(source: str, destination: str) -> None:
    from gbp_rewrite.converter import convert

    report = convert(
        source, destination,
        layers=FLAGS.layers, exclude_layers=FLAGS.exclude_layers, rule=FLAGS.rule,
        signature=FLAGS.signature, output=FLAGS.output, score=FLAGS.score, overwrite=FLAGS.overwrite,
        saliency_map=FLAGS.saliency_map, version=FLAGS.serving_version,
        safe_mode=not FLAGS.unsafe_deserialization, allow_file_ops=FLAGS.allow_file_ops,
        fold_batchnorms=FLAGS.fold_batchnorms, cam=FLAGS.cam, cam_layer=FLAGS.cam_layer,
    )
    common.emit(report)
