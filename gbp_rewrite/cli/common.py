"""What the commands share: the usage error, the flags several commands take, printing results.

Each command module adds its own flags to its own sub-parser (gbp_rewrite.cli builds them on
absl's argparse_flags), so `gbp-rewrite COMMAND --help` lists exactly that command's flags. Flags
keep absl's spelling: `--name value` or `--name=value`, booleans `--name` / `--noname`, and list
flags accumulate (`--layers a --layers b,c` is a, b and c).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROGRAM = "gbp-rewrite"

# gbp_rewrite.pictures.images.PREPROCESSING's keys, copied: importing images would load TensorFlow
# before the command line is parsed (tests/test_deploy_mends.py keeps the two equal).
PREPROCESS_MODES = ("unit", "symmetric", "caffe", "none")
# gbp_rewrite.pictures.render.COLORMAP_NAMES and SIGNS, copied for the same reason (tests keep them equal).
COLORMAPS = ("gray", "inferno", "viridis")
SIGNS = ("abs", "positive", "negative")


class UsageError(Exception):
    """Bad command-line usage: exit status 2 (a command's run() may raise it for flag combinations)."""


# ---------------------------------------------------------------------------------------------
# Flag kinds absl has and argparse spells differently


def add_bool(parser: argparse.ArgumentParser, name: str, help_text: str, *, default: bool = False) -> None:
    """`--name` and `--noname`, as absl's boolean flags (the last one given wins)."""
    shown = f"{help_text} (on by default; --no{name} turns it off)" if default else help_text
    parser.add_argument(f"--{name}", dest=name, action="store_true", help=shown)
    parser.add_argument(f"--no{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
    parser.set_defaults(**{name: default})


def add_list(parser: argparse.ArgumentParser, name: str, help_text: str, *, metavar: str) -> None:
    """A list flag: repeated flags accumulate, each value may be a comma-separated list."""
    parser.add_argument(f"--{name}", action="append", metavar=metavar,
                        help=f"{help_text} Repeat the flag or give a comma-separated list.")


def split_list(values: list[str] | None) -> list[str] | None:
    """The accumulated values of a list flag, commas split; None when the flag was not given."""
    if values is None:
        return None
    return [item for value in values for item in value.split(",") if item]


def split_paths(values: list[str] | None) -> list[str]:
    """Each --image value is a path, or a comma-separated list of paths (an existing path wins)."""
    paths = []
    for value in values or []:
        paths.extend([value] if Path(value).exists() else [p for p in value.split(",") if p])
    return paths


def integer_at_least(lowest: int):
    """An argparse type: an integer >= lowest, with absl's wording for the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value} is not >= {lowest}")
        return value

    return parse


# ---------------------------------------------------------------------------------------------
# Flags of several commands


def add_verbose(parser: argparse.ArgumentParser) -> None:
    add_bool(parser, "verbose", "log progress, TensorFlow's warnings, and tracebacks of internal errors.")


def add_json(parser: argparse.ArgumentParser) -> None:
    add_bool(parser, "json", "print JSON instead of text.")


def add_signature(parser: argparse.ArgumentParser, help_text: str, *, default: str | None) -> None:
    parser.add_argument("--signature", default=default, metavar="KEY", help=help_text)


def add_unsafe_deserialization(parser: argparse.ArgumentParser) -> None:
    add_bool(parser, "unsafe_deserialization",
             "allow loading a .keras/.h5 file that Keras' safe mode refuses, such as one with a Lambda "
             "layer. A risk: a Lambda layer is arbitrary Python code stored in the file, and it runs when "
             "the file is loaded; use only on files you trust.")


def add_allow_file_ops(parser: argparse.ArgumentParser) -> None:
    add_bool(parser, "allow_file_ops",
             "load and run a SavedModel whose graph reads or writes files (or the network) outside the "
             "standard save/restore functions; such a model is refused by default, since this command "
             "runs it. Only for models you trust.")


def add_image(parser: argparse.ArgumentParser, help_text: str) -> None:
    add_list(parser, "image", help_text, metavar="PATH")


def require_one_image_source(args: argparse.Namespace, command: str) -> None:
    """A command that reads images takes them from --image or --dir, exactly one of the two."""
    if bool(args.image) == bool(args.dir):
        raise UsageError(f"'{command}' takes the images with either --image or --dir (one of them)")


def add_preprocess(parser: argparse.ArgumentParser, *, purpose: str = "") -> None:
    parser.add_argument("--preprocess", default="unit", choices=PREPROCESS_MODES,
                        help="how the model expects its pixels, as in Keras applications: unit = x/255, "
                             "symmetric = x/127.5-1, caffe = RGB->BGR minus ImageNet means, none = raw "
                             f"0..255 (default: unit){purpose}.")


def add_grayscale_to_rgb(parser: argparse.ArgumentParser) -> None:
    add_bool(parser, "grayscale_to_rgb",
             "take grey-scale images as RGB (repeat the grey channel); without it they are refused.")


def number_between(low: float, high: float, *, low_open: bool = False):
    """An argparse type: a number in [low, high] (or (low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {'(' if low_open else '['}{low}, {high}]")
        return value

    return parse


def add_drawing(parser: argparse.ArgumentParser) -> None:
    """How the heat is drawn (captum's visualisation has the same choices)."""
    parser.add_argument("--colormap", default="inferno", choices=COLORMAPS,
                        help="the heat map's colours (default: inferno).")
    parser.add_argument("--alpha", type=number_between(0.0, 1.0), default=0.5, metavar="A",
                        help="the overlay's colour weight at full heat, 0 to 1; where the heat is zero "
                             "the photo is untouched (default: 0.5).")
    parser.add_argument("--clip_percentile", type=number_between(0.0, 100.0, low_open=True), default=99.5,
                        metavar="P", help="the heat's white point: this percentile of the pixel heats "
                        "and above is full heat; 100 = the maximum (default: 99.5).")
    parser.add_argument("--sign", default="abs", choices=SIGNS,
                        help="which gradient values make heat: abs = |g|, positive = what raises the "
                             "score, negative = what lowers it (default: abs).")


def add_labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", metavar="FILE",
                        help="the class names, in class order: one per line, or a JSON list (or an "
                             "object with 'class_names'); they caption the figures and fill the "
                             "results' label.")


def emit(result, args: argparse.Namespace) -> None:
    """Print a result object (with to_text/to_dict) as text, or as JSON with --json."""
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(result.to_text() + "\n")
