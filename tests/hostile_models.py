"""Small models for the robustness tests (issue #7): one with an asset, programs that touch files,
and one deep enough that writing its export takes seconds (to interrupt it).

Every builder writes a SavedModel to `path` and returns `path`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

VOCABULARY = ("dog", "cat", "bird")


def vocabulary_weights() -> np.ndarray:
    """The weights w of vocabulary_module's model."""
    return np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)


class _Vocabulary(tf.Module):
    """scores = relu(x @ w) * (1 + index of 'cat' in the vocabulary file): the asset matters."""

    def __init__(self, vocabulary_file: str):
        super().__init__()
        initializer = tf.lookup.TextFileInitializer(
            vocabulary_file, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
            tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
        self.table = tf.lookup.StaticHashTable(initializer, default_value=-1)
        self.w = tf.Variable(vocabulary_weights())

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x):
        scale = tf.cast(self.table.lookup(tf.constant("cat")), tf.float32) + 1.0
        return {"scores": tf.nn.relu(tf.matmul(x, self.w)) * scale}


def vocabulary_source_file(path: Path) -> Path:
    """The vocabulary file vocabulary_module(path) builds its model from (outside the model)."""
    return path.parent / f"{path.name}-vocabulary" / "vocabulary.txt"


def vocabulary_module(path: Path) -> Path:
    """A tf.Module with a StaticHashTable read from a vocabulary file: assets/vocabulary.txt."""
    vocabulary = vocabulary_source_file(path)
    vocabulary.parent.mkdir(parents=True, exist_ok=True)
    vocabulary.write_text("\n".join(VOCABULARY) + "\n")
    module = _Vocabulary(str(vocabulary))
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


class _FileProgram(tf.Module):
    """relu(x @ w) plus one side effect on the file system, chosen by `effect`."""

    def __init__(self, effect: str, target: str):
        super().__init__()
        self.w = tf.Variable(np.ones((3, 2), np.float32))
        self.effect, self.target = effect, target

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(self, x):
        scores = tf.nn.relu(tf.matmul(x, self.w))
        if self.effect == "write":
            tf.io.write_file(self.target, tf.strings.as_string(tf.reduce_sum(x)))
        elif self.effect == "read":
            scores += 0.0 * tf.cast(tf.strings.length(tf.io.read_file(self.target)), tf.float32)
        elif self.effect == "list":
            scores += 0.0 * tf.cast(tf.size(tf.io.matching_files(self.target)), tf.float32)
        elif self.effect == "checkpoint":
            tf.raw_ops.SaveV2(prefix=self.target, tensor_names=["w"], shape_and_slices=[""],
                              tensors=[self.w.read_value()])
        elif self.effect == "print_file":
            tf.print("x", x, output_stream="file://" + self.target)
        elif self.effect == "print_stderr":
            tf.print("x", x, output_stream=sys.stderr)
        return {"scores": scores}


FILE_EFFECTS = ("write", "read", "list", "checkpoint", "print_file")


def file_program(path: Path, *, effect: str, target: Path) -> Path:
    """A model whose signature touches `target` ('write', 'read', 'list', 'checkpoint',
    'print_file') or only prints to stderr ('print_stderr', which is harmless)."""
    module = _FileProgram(effect, str(target))
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


class _Deep(tf.Module):
    def __init__(self, depth: int, width: int):
        super().__init__()
        rng = np.random.default_rng(0)
        self.kernels = [tf.Variable(rng.normal(0, 0.35, (width, width)).astype(np.float32), name=f"k{i}")
                        for i in range(depth)]
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None, width], tf.float32, name="x")])

    def _serve(self, x):
        for i, kernel in enumerate(self.kernels):
            with tf.name_scope(f"dense{i}"):
                x = tf.nn.relu(tf.matmul(x, kernel))
        return {"scores": x}


def deep_module(path: Path, *, depth: int, width: int = 16) -> Path:
    """`depth` dense+ReLU layers: tiny weights, but saving and reloading the explainable export of
    so many ops takes seconds, long enough to interrupt a conversion while it writes."""
    module = _Deep(depth, width)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path
