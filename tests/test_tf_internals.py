"""gbp_rewrite.tf_internals: the one home of private TensorFlow/Keras APIs, and its import check."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gbp_rewrite import tf_internals
from gbp_rewrite.errors import GbpError, UnsupportedTensorFlowError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gbp_rewrite"

pytestmark = pytest.mark.oldest


def test_a_missing_tensorflow_api_names_itself_and_the_supported_range(monkeypatch):
    monkeypatch.delattr(tf_internals.gen_nn_ops, "relu_grad")
    with pytest.raises(UnsupportedTensorFlowError) as caught:
        tf_internals.check_tensorflow()
    message = str(caught.value)
    assert isinstance(caught.value, GbpError) and "\n" not in message
    assert "tensorflow.python.ops.gen_nn_ops.relu_grad" in message
    assert "build the Relu gradient rules" in message
    assert f"tensorflow{tf_internals.SUPPORTED_TENSORFLOW}" in message


def test_the_gradient_attr_check_fails_when_tensorflow_reads_another_attr(monkeypatch):
    monkeypatch.setattr(tf_internals, "GRADIENT_OP_TYPE_ATTR", "_gradient_op_type_renamed")
    with pytest.raises(UnsupportedTensorFlowError, match="_gradient_op_type_renamed"):
        tf_internals.check_tensorflow()


def test_the_graph_function_check_fails_without_get_function(monkeypatch):
    import tensorflow as tf

    monkeypatch.delattr(tf.Graph, "_get_function")
    with pytest.raises(UnsupportedTensorFlowError, match=r"no tf\.Graph\._get_function .*--cam"):
        tf_internals.check_tensorflow()


def test_a_missing_keras_api_names_itself(monkeypatch):
    from keras.src.saving import serialization_lib

    tf_internals.keras_api.cache_clear()
    monkeypatch.delattr(serialization_lib, "SafeModeScope")
    try:
        with pytest.raises(UnsupportedTensorFlowError, match=r"no keras\.src\.saving\.serialization_lib\.SafeModeScope"):
            tf_internals.keras_api()
    finally:
        tf_internals.keras_api.cache_clear()
    monkeypatch.undo()
    assert tf_internals.keras_api().SafeModeScope is serialization_lib.SafeModeScope


def test_the_supported_range_is_pyprojects():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert f"tensorflow{tf_internals.SUPPORTED_TENSORFLOW}" in project["dependencies"]


# Private names of TensorFlow and Keras: their private packages, and underscore attributes of
# objects that are not our own (self._x and cls._x are).
_PRIVATE = re.compile(r"tensorflow\.python|keras\.src|(?<!self)(?<!cls)\.\_[a-z]")


def test_private_apis_are_used_only_in_tf_internals():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "tf_internals.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if _PRIVATE.search(code) and "gbp_rewrite._version" not in code and "os._exit" not in code:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "private TF/Keras API outside gbp_rewrite/tf_internals.py:\n" + "\n".join(offenders)
