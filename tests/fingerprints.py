"""Content digests that prove a conversion left its source as it was.

Kept free of pytest and TensorFlow so that the fuzz worker process (tests/fuzz_worker.py) and the
test session (conftest.py) share the one definition.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (symlinks resolved), to prove a source was not touched."""
    digest = {}
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            digest[str(file.relative_to(path))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digest


def source_fingerprint(source) -> object:
    """sha256 of a source file or of every file of a source directory; a Keras model's weights."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
        return tree_digest(path)
    weights = getattr(source, "weights", None)
    return None if weights is None else [np.array(w.numpy()).tobytes() for w in weights]
