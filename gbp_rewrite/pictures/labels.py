"""Class names for pictures and results: `--labels FILE`, one name per line or a JSON list.

    load_labels("testdata/shapes_cnn_labels.txt")  ->  ["circle", "square", "triangle", "cross"]
    class_name(labels, 2)                         ->  "triangle"   (labels None: "class 2")

A JSON file may also be an object with "class_names" (the testdata model's description,
testdata/shapes_cnn.json, is one), so the file that describes a model can name its classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from gbp_rewrite.errors import OptionError, one_line


def load_labels(path: str | os.PathLike) -> list[str]:
    """The class names in `path`, in class order; any problem is a one-line OptionError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OptionError(f"cannot read the labels file '{path}': {e.strerror}; give a file with one "
                          "class name per line, or a JSON list of names") from None
    except UnicodeDecodeError:
        raise OptionError(f"the labels file '{path}' is not UTF-8 text; give a file with one class "
                          "name per line, or a JSON list of names") from None
    names = _json_names(path, text) if text.lstrip()[:1] in ("[", "{") else _line_names(text)
    if not names:
        raise OptionError(f"the labels file '{path}' names no class; give one class name per line, or "
                          "a JSON list of names")
    return names


def _json_names(path: Path, text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise OptionError(f"the labels file '{path}' is not valid JSON ({one_line(e)}); give a JSON "
                          "list of names, or one name per line") from None
    if isinstance(value, dict):
        value = value.get("class_names")
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise OptionError(f"the labels file '{path}' is JSON but not a list of names (nor an object "
                          "with a 'class_names' list); give [\"name0\", \"name1\", ...]")
    return [str(v) for v in value]


def _line_names(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:  # a trailing newline is no class
        lines.pop()
    return lines


def check_labels(labels: Sequence[str] | None, num_classes: int, *, model: str) -> None:
    """Refuse a labels list that does not name the model's classes one for one."""
    if labels is not None and len(labels) != num_classes:
        raise OptionError(f"--labels names {len(labels)} classes, but the model '{model}' has "
                          f"{num_classes}; give one name per class, in class order")


def class_name(labels: Sequence[str] | None, class_index: int) -> str:
    """The class's name, or 'class N' without labels."""
    if labels is not None and 0 <= class_index < len(labels):
        return labels[class_index]
    return f"class {class_index}"
