"""Flags and helpers shared by several commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string("signature", "serving_default", "the signature to work on.")
flags.DEFINE_bool("json", False, "print JSON instead of text.")
flags.DEFINE_bool("verbose", False, "log progress, TensorFlow's warnings, and tracebacks of internal errors.")
flags.DEFINE_bool("unsafe_deserialization", False,
                  "convert, inspect, sanity: allow loading a .keras/.h5 file that Keras' safe mode refuses, such "
                  "as one with a Lambda layer. A risk: a Lambda layer is arbitrary Python code stored in "
                  "the file, and it runs when the file is loaded; use only on files you trust.")
flags.DEFINE_bool("allow_file_ops", False, "convert, explain, verify: load and run a SavedModel whose graph "
                  "reads or writes files (or the network) outside the standard save/restore functions; "
                  "such a model is refused by default, since these commands run it. Only for models you "
                  "trust.")

# Flags of the image commands (explain, request, decode).

# gbp_rewrite.images.PREPROCESSING's keys, copied: importing images would load TensorFlow before
# the command line is parsed (tests/test_deploy_mends.py keeps the two equal).
PREPROCESS_MODES = ("unit", "symmetric", "caffe", "none")

flags.DEFINE_multi_string("image", None, "explain, request, decode, sanity: an image file (PNG, JPEG, BMP, GIF); "
                          "repeat the flag or give a comma-separated list.")
flags.DEFINE_string("out", None, "explain: the folder for the PNGs, results.csv and summary.json "
                    "(created if missing; files of the same names are replaced); sanity: the folder for sanity.txt, "
                    "sanity.json and sanity.png. request: the file for "
                    "the JSON body (default: stdout). decode: the folder for the .npy files and PNGs.")
flags.DEFINE_enum("preprocess", "unit", PREPROCESS_MODES,
                  "explain, request, sanity: how the model expects its pixels, as in Keras applications: unit = x/255, "
                  "symmetric = x/127.5-1, caffe = RGB->BGR minus ImageNet means, none = raw 0..255.")
flags.DEFINE_bool("grayscale_to_rgb", False, "explain, request: take grey-scale images as RGB (repeat the "
                  "grey channel); without it they are refused.")


def emit(result) -> None:
    """Print a result object (with to_text/to_dict) as text, or as JSON with --json."""
    if FLAGS.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(result.to_text() + "\n")


def split_paths(values: list[str]) -> list[str]:
    """Each --image value is a path, or a comma-separated list of paths (an existing path wins)."""
    paths = []
    for value in values:
        paths.extend([value] if Path(value).exists() else [p for p in value.split(",") if p])
    return paths
