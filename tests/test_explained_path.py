"""The report's status per op says what happened to the explanation (issue 11 item 5), and the
plain gradient works on models without ReLUs (issue 13 item 1).

Each status is checked op by op, on both paths, and each saliency against an independent reference:
the float64 numpy reference (tests/numpy_reference.py) built from the model's weights, or
TensorFlow's own gradient of the source model.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
import model_zoo
import numpy_reference as ref
from conftest import INPUT_SHAPE, assert_close_relative, reference_inputs
from gbp_rewrite.errors import GbpError

OFF_PATH = "off the explained path"
PATHS = ("graph", "keras")


@pytest.fixture(scope="module")
def keras():
    import keras

    return keras


def _convert(model, path: str, tmp_path_factory, **options):
    """Convert `model` on the graph path (model.export, then convert the export) or the Keras path."""
    root = tmp_path_factory.mktemp(f"{model.name}_{path}")
    if path == "graph":
        model.export(str(root / "export"), verbose=False)
        source = root / "export"
    else:
        source = model
    report = gbp_rewrite.convert(source, root / "out", **options)
    return root / "out", report


def _serve(export_dir, x: np.ndarray) -> dict[str, np.ndarray]:
    loaded = tf.saved_model.load(str(export_dir))
    (key,) = [k for k in loaded.signatures["serving_default"].structured_input_signature[1]]
    outputs = loaded.signatures["serving_default"](**{key: tf.constant(x)})
    return {k: v.numpy() for k, v in outputs.items()}


def _statuses(report) -> dict[str, str]:
    return {site.layer: site.status for site in report.sites}


# ---------------------------------------------------------------------------------------------
# Two heads and a stop_gradient


@pytest.fixture(scope="module")
def two_heads(keras):
    return model_zoo.two_head_keras3(keras, input_shape=INPUT_SHAPE, seed=3)


def _head_spec(model, head: str):
    """The explained head as a numpy reference spec (the stop_gradient branch adds no gradient)."""
    layer = model.get_layer
    if head == "a":
        return [{"type": "flatten"}, model_zoo.dense_spec(layer("trunk"), activation="relu"),
                model_zoo.dense_spec(layer("a_logits")), {"type": "softmax"}]
    return [{"type": "flatten"}, model_zoo.dense_spec(layer("b_hidden"), activation="relu"),
            model_zoo.dense_spec(layer("b"))]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head, on_path", [("a", "trunk"), ("b", "b_hidden")])
def test_each_relu_is_rewritten_only_on_the_explained_heads_path(two_heads, tmp_path_factory, path, head, on_path):
    export_dir, report = _convert(two_heads, path, tmp_path_factory, output=head)
    expected = {name: OFF_PATH for name in ("trunk", "frozen", "b_hidden")}
    expected[on_path] = "rewritten"
    assert _statuses(report) == expected
    assert report.checks["rule applied"].startswith("guided gradient built for 1 of 3 selected ReLU ops")
    assert "1 rewritten" in report.to_text() and OFF_PATH in report.to_text()

    spec = _head_spec(two_heads, head)
    x = reference_inputs(spec, batch=4)
    outputs = _serve(export_dir, x)
    want, _ = ref.saliency(spec, x, rule="guided", score="logit", class_index=outputs["explained_class"])
    assert_close_relative(outputs["saliency"], want)


# ---------------------------------------------------------------------------------------------
# A custom layer with a ReLU in its own call() next to its activation


@pytest.fixture(scope="module")
def relu_in_call(keras):
    return model_zoo.relu_in_call_keras3(keras, input_shape=INPUT_SHAPE, seed=4)


@pytest.mark.parametrize("path", PATHS)
def test_a_relu_in_a_layers_own_call_is_reported_per_op(relu_in_call, tmp_path_factory, path):
    export_dir, report = _convert(relu_in_call, path, tmp_path_factory)
    by_op = {site.op_name.rsplit("/", 1)[-1]: site.status for site in report.sites}
    assert set(by_op) == {"Relu", "Relu_1"}  # call(): relu(x) first, then the activation
    assert by_op["Relu_1"] == "rewritten"
    layer = relu_in_call.get_layer
    spec = [{"type": "flatten"}, model_zoo.dense_spec(layer("pre")), {"type": "relu", "name": "own"},
            model_zoo.dense_spec(layer("custom"), activation="relu"), model_zoo.dense_spec(layer("logits"))]
    if path == "graph":  # every ReLU op gets the rule
        assert by_op["Relu"] == "rewritten"
        assert report.checks["rule applied"].startswith("guided gradient built for 2 of 2")
        layer_rules = {}
    else:  # the clone rewrites the activation; the layer's own relu keeps its true gradient
        assert by_op["Relu"].startswith("kept: computed in its layer's own code")
        assert report.checks["rule applied"].startswith("guided gradient built for 1 of 2")
        assert any("own code" in w for w in report.warnings)
        layer_rules = {"own": "vanilla"}
    x = reference_inputs(spec, batch=4)
    outputs = _serve(export_dir, x)
    want, classes = ref.saliency(spec, x, rule="guided", layer_rules=layer_rules)
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    assert_close_relative(outputs["saliency"], want)
    other, _ = ref.saliency(spec, x, rule="guided", layer_rules={"own": "guided" if layer_rules else "vanilla"})
    assert not np.allclose(want, other, rtol=1e-3, atol=1e-7), "the own relu's rule must matter here"


# ---------------------------------------------------------------------------------------------
# A ReLU only in the other head; models without ReLUs: the vanilla rule


@pytest.fixture(scope="module")
def other_head(keras):
    return model_zoo.other_head_relu_keras3(keras, input_shape=INPUT_SHAPE, seed=5)


def _true_gradient(model, x: np.ndarray, head: str | None, classes: np.ndarray) -> np.ndarray:
    """TensorFlow's own gradient of the source model's output `head` at `classes` (vanilla, logit
    of an output without softmax)."""
    tensor = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        out = model(tensor)
        out = out[head] if head is not None else out
        score = tf.gather(out, classes, axis=1, batch_dims=1)
    return tape.gradient(score, tensor).numpy()


@pytest.mark.parametrize("path", PATHS)
def test_guided_with_no_relu_on_the_explained_path_names_vanilla(other_head, tmp_path_factory, path):
    with pytest.raises(GbpError, match="--rule vanilla"):
        _convert(other_head, path, tmp_path_factory, output="a")


@pytest.mark.parametrize("path", PATHS)
def test_vanilla_explains_a_head_without_relu(other_head, tmp_path_factory, path):
    export_dir, report = _convert(other_head, path, tmp_path_factory, output="a", rule="vanilla")
    assert _statuses(report) == {"b_hidden": OFF_PATH}
    assert "no ReLU needed" in report.checks["rule applied"]
    x = np.random.default_rng(6).normal(0, 1, (3, *INPUT_SHAPE)).astype(np.float32)
    outputs = _serve(export_dir, x)
    want = _true_gradient(other_head, x, "a", outputs["explained_class"])
    assert_close_relative(outputs["saliency"], want)


def _swish_model(keras):
    layers = keras.layers
    keras.utils.set_random_seed(7)
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = layers.Conv2D(4, 3, padding="same", activation="swish", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(3, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="swish_net")


def _gelu_model(keras):
    layers = keras.layers
    keras.utils.set_random_seed(8)
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.LayerNormalization(name="norm")(x)
    x = layers.Dense(6, activation="gelu", name="mlp")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(3, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="gelu_net")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("build", [_swish_model, _gelu_model], ids=["swish", "gelu"])
def test_vanilla_works_on_models_without_relu(keras, tmp_path_factory, path, build):
    model = build(keras)
    with pytest.raises(GbpError, match="--rule vanilla"):
        _convert(model, path, tmp_path_factory)  # guided: nothing to rewrite, the error says what to do
    export_dir, report = _convert(model, path, tmp_path_factory, rule="vanilla", score="probability")
    assert not report.rewritten and "no ReLU needed" in report.checks["rule applied"]
    x = np.random.default_rng(9).normal(0, 1, (3, *INPUT_SHAPE)).astype(np.float32)
    outputs = _serve(export_dir, x)
    want = _true_gradient(model, x, None, outputs["explained_class"])  # d(probability)/dx
    assert_close_relative(outputs["saliency"], want)
