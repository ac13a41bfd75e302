"""Flags and helpers shared by several commands."""

from __future__ import annotations

import json
import sys

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string("signature", "serving_default", "the signature to work on.")
flags.DEFINE_bool("json", False, "print JSON instead of text.")
flags.DEFINE_bool("verbose", False, "log progress, TensorFlow's warnings, and tracebacks of internal errors.")


def emit(result) -> None:
    """Print a result object (with to_text/to_dict) as text, or as JSON with --json."""
    if FLAGS.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(result.to_text() + "\n")
