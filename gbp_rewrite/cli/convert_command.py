"""`gbp-rewrite convert SRC DST`: write an explainable copy of a model."""

from __future__ import annotations

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS

NAME = "convert"
ARGS = ("SRC", "DST")
SUMMARY = ("Write an explainable copy of SRC to DST: the signature returns the original outputs plus "
           "`saliency` (d score / d input, same shape and dtype as the input) and `explained_class`; "
           "a second signature `explain_class` takes a class per example.")
FLAG_NAMES = {"layers", "exclude_layers", "rule", "signature", "output", "score", "overwrite", "json"}

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
flags.DEFINE_bool("overwrite", False, "convert: replace DST if it exists (otherwise it is left untouched).")


def run(source: str, destination: str) -> None:
    from gbp_rewrite.converter import convert

    report = convert(
        source, destination,
        layers=FLAGS.layers, exclude_layers=FLAGS.exclude_layers, rule=FLAGS.rule,
        signature=FLAGS.signature, output=FLAGS.output, score=FLAGS.score, overwrite=FLAGS.overwrite,
    )
    common.emit(report)
