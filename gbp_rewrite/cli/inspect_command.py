"""`gbp-rewrite inspect MODEL`: signatures, inputs, outputs and ReLU-family sites by layer."""

from __future__ import annotations

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS

NAME = "inspect"
ARGS = ("MODEL",)
SUMMARY = ("List a model's signatures (inputs, outputs) and its ReLU-family ops by layer (a SavedModel "
           "directory, or a .keras/.h5 Keras file as model.export would serve it).")
FLAG_NAMES = {"signature", "json", "unsafe_deserialization"}


def run(model: str) -> None:
    from gbp_rewrite.inspection import inspect

    info = inspect(model, signature=FLAGS.signature if FLAGS["signature"].present else None,
                   safe_mode=not FLAGS.unsafe_deserialization)
    common.emit(info)
