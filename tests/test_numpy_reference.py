"""Tests proving that tests/numpy_reference.py computes the right thing.

The reference is checked against (a) central finite differences in float64,
(b) TensorFlow's autodiff on the equivalent Keras model, (c) a separate
TensorFlow implementation of the guided/deconvnet rules with
``tf.custom_gradient`` and (d) small networks whose saliency is derived by
hand below.
"""

import numpy as np
import pytest
import tensorflow as tf

import numpy_reference as ref
from conftest import assert_close_relative, reference_inputs

INPUT_SHAPE = ref.DEFAULT_INPUT_SHAPE
SEED = 0


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def _finite_difference_saliency(spec, x, *, score, classes, eps=1e-6):
    """Central finite differences of the score w.r.t. every input element."""
    flat = x.reshape(len(x), -1)
    grad = np.zeros_like(flat)
    for index in range(flat.shape[1]):
        step = np.zeros_like(flat)
        step[:, index] = eps
        plus, _ = ref.score_value(spec, (flat + step).reshape(x.shape),
                                  score=score, class_index=classes)
        minus, _ = ref.score_value(spec, (flat - step).reshape(x.shape),
                                   score=score, class_index=classes)
        grad[:, index] = (plus - minus) / (2 * eps)
    return grad.reshape(x.shape)


def _tf_relu_family(rule, cap):
    """ReLU (cap None) or ReLU6 with the rule's gradient, via custom_gradient."""

    @tf.custom_gradient
    def activation(z):
        y = tf.nn.relu(z) if cap is None else tf.nn.relu6(z)

        def grad(dy):
            backward = tf.cast(dy > 0, dy.dtype)
            forward_mask = tf.cast(z > 0, dy.dtype)
            if cap is not None:
                forward_mask *= tf.cast(z < cap, dy.dtype)
            if rule == "deconvnet":
                return dy * backward
            if rule == "guided":
                return dy * forward_mask * backward
            return dy * forward_mask

        return y, grad

    return activation


def _tf_activation(name, z, rule, score):
    """Apply a spec activation with TF ops (softmax skipped for logits).

    The vanilla rule uses TF's own Relu/Relu6 gradients; the other rules use
    ``tf.custom_gradient``.
    """
    if name in (None, "linear"):
        return z
    if rule == "vanilla" and name in ("relu", "relu6"):  # TF's own gradient
        return tf.nn.relu(z) if name == "relu" else tf.nn.relu6(z)
    if name == "relu":
        return _tf_relu_family(rule, None)(z)
    if name == "relu6":
        return _tf_relu_family(rule, 6.0)(z)
    if name == "softmax":
        return z if score == "logit" else tf.nn.softmax(z)
    raise ValueError(name)


def _tf_layer(layer, x, rule, score):
    """One spec layer written directly with TF ops (float64)."""
    kind, activation = layer["type"], layer.get("activation")
    if kind == "conv2d":
        z = tf.nn.conv2d(x, layer["kernel"], layer.get("strides", 1),
                         layer.get("padding", "valid").upper())
        return _tf_activation(activation, z + layer["bias"], rule, score)
    if kind == "dense":
        z = tf.matmul(x, layer["kernel"]) + layer["bias"]
        return _tf_activation(activation, z, rule, score)
    if kind in ("relu", "relu6", "softmax"):
        return _tf_activation(kind, x, rule, score)
    if kind == "maxpool":
        return tf.nn.max_pool2d(x, layer["pool"], layer["strides"], "VALID")
    if kind == "flatten":
        return tf.reshape(x, [tf.shape(x)[0], -1])
    if kind == "gap":
        return tf.reduce_mean(x, axis=[1, 2])
    if kind == "batchnorm":
        return tf.nn.batch_normalization(x, layer["mean"], layer["var"],
                                         layer["beta"], layer["gamma"],
                                         layer["epsilon"])
    if kind == "residual":
        return x + _tf_layers(layer["layers"], x, rule, score)
    raise ValueError(kind)


def _tf_layers(layers, x, rule, score):
    """Apply a list of spec layers with TF ops."""
    for layer in layers:
        x = _tf_layer(layer, x, rule, score)
    return x


def _tf_saliency(spec, x, *, rule, score, classes):
    """Saliency from the TF custom-gradient implementation (float64)."""
    x = tf.constant(x, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        output = _tf_layers(spec, x, rule, score)
        picked = tf.gather(output, classes, axis=1, batch_dims=1)
    return tape.gradient(picked, x).numpy()


# --------------------------------------------------------------------------
# Geometry: TF padding convention, conv and max-pool shapes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("size, kernel, stride, expected", [
    (4, 3, 2, (0, 1)),   # even input, stride 2: extra padding bottom/right
    (8, 3, 2, (0, 1)),
    (5, 3, 2, (1, 1)),
    (8, 2, 2, (0, 0)),
    (7, 2, 2, (0, 1)),
    (6, 3, 1, (1, 1)),
    (6, 4, 1, (1, 2)),
    (3, 5, 1, (2, 2)),
])
def test_same_padding_follows_tensorflow(size, kernel, stride, expected):
    assert ref.same_padding(size, kernel, stride) == expected


def test_conv_and_pool_geometries_match_tensorflow():
    """Forward and vanilla gradient vs TF for many sizes/strides/paddings."""
    rng = np.random.default_rng(SEED)
    for size in (5, 6, 7):
        for kernel in (1, 2, 3, 4):
            for stride in (1, 2):
                for padding in ("valid", "same"):
                    conv = {"type": "conv2d", "strides": stride,
                            "padding": padding,
                            "kernel": rng.normal(size=(kernel, kernel, 2, 3)),
                            "bias": rng.normal(size=3)}
                    head = [conv]
                    if ref.output_shape(head, (size, size, 2))[0] >= 2:
                        head.append({"type": "maxpool", "pool": 2,
                                     "strides": 1})
                    head.append({"type": "flatten"})
                    features = int(np.prod(ref.output_shape(head,
                                                            (size, size, 2))))
                    spec = head + [{"type": "dense",
                                    "kernel": rng.normal(size=(features, 2)),
                                    "bias": np.zeros(2)}]
                    x = rng.normal(size=(2, size, size, 2))
                    expected = _tf_layers(spec, tf.constant(x), "vanilla",
                                          "logit").numpy()
                    np.testing.assert_allclose(ref.forward(spec, x), expected,
                                               rtol=1e-10, atol=1e-10)
                    saliency, classes = ref.saliency(spec, x, rule="vanilla")
                    tf_saliency = _tf_saliency(spec, x, rule="vanilla",
                                               score="logit", classes=classes)
                    np.testing.assert_allclose(saliency, tf_saliency,
                                               rtol=1e-10, atol=1e-10)


def test_overlapping_maxpool_matches_tensorflow():
    """Overlapping windows (pool 3, stride 2) accumulate gradients."""
    rng = np.random.default_rng(SEED)
    spec = [{"type": "maxpool", "pool": 3, "strides": 2}, {"type": "flatten"},
            {"type": "dense", "kernel": rng.normal(size=(18, 3)),
             "bias": np.zeros(3)}]
    x = rng.normal(size=(3, 7, 7, 2))
    saliency, classes = ref.saliency(spec, x, rule="vanilla")
    expected = _tf_saliency(spec, x, rule="vanilla", score="logit",
                            classes=classes)
    np.testing.assert_allclose(saliency, expected, rtol=1e-12, atol=1e-12)


def test_maxpool_ties_route_to_first_position_like_tensorflow():
    """Exact ties (e.g. windows of ReLU zeros) go to the first arg-max."""
    x = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 3.0], [3.0, 3.0]])
    x = x.reshape(1, 4, 2, 1)
    spec = [{"type": "maxpool", "pool": 2, "strides": 2}, {"type": "flatten"},
            {"type": "dense", "kernel": np.array([[1.0], [2.0]]),
             "bias": np.zeros(1)}]
    saliency, _ = ref.saliency(spec, x, rule="vanilla")
    expected = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    np.testing.assert_array_equal(saliency.reshape(4, 2), expected)
    tf_saliency = _tf_saliency(spec, x, rule="vanilla", score="logit",
                               classes=np.array([0]))
    np.testing.assert_array_equal(saliency, tf_saliency)


# --------------------------------------------------------------------------
# Vanilla rule vs finite differences and TensorFlow autodiff
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind, score, class_index", [
    ("mlp", "logit", None),
    ("cnn", "logit", None),
    ("cnn", "probability", None),
    ("cnn", "probability", 3),
    ("residual_bn", "logit", None),
    ("residual_bn", "logit", 1),
])
def test_vanilla_matches_finite_differences(kind, score, class_index):
    spec = ref.random_spec(kind, seed=SEED)
    x = reference_inputs(spec, batch=3, seed=SEED, margin=1e-3,
                         dtype=np.float64)
    saliency, classes = ref.saliency(spec, x, rule="vanilla", score=score,
                                     class_index=class_index)
    numeric = _finite_difference_saliency(spec, x, score=score,
                                          classes=classes)
    assert_close_relative(saliency, numeric, rtol=1e-6)


def _sigmoid_spec(kind):
    """An mlp spec ending in sigmoid: "binary" (one unit, fused) or "multilabel" (a sigmoid layer)."""
    if kind == "binary":
        spec = ref.random_spec("mlp", seed=1, num_classes=1)  # seed 1: both classes occur
        return spec[:-1] + [dict(spec[-1], activation="sigmoid")]
    return ref.random_spec("mlp", seed=SEED) + [{"type": "sigmoid"}]


@pytest.mark.parametrize("kind, score, class_index", [
    ("binary", "logit", None), ("binary", "logit", 0), ("binary", "logit", 1),
    ("binary", "probability", 0), ("binary", "probability", 1),
    ("multilabel", "logit", None), ("multilabel", "probability", 2),
])
def test_sigmoid_vanilla_matches_finite_differences(kind, score, class_index):
    """The sigmoid head's scores (z or -z, p or 1 - p; z_c or p_c) and their backprop agree."""
    spec = _sigmoid_spec(kind)
    x = reference_inputs(spec, batch=4, seed=SEED, margin=1e-3, dtype=np.float64)
    saliency, classes = ref.saliency(spec, x, rule="vanilla", score=score, class_index=class_index)
    numeric = _finite_difference_saliency(spec, x, score=score, classes=classes)
    assert_close_relative(saliency, numeric, rtol=1e-6)


def test_binary_default_class_is_the_predicted_one():
    spec = _sigmoid_spec("binary")
    x = ref.random_inputs(INPUT_SHAPE, batch=16, seed=SEED)
    _, classes = ref.saliency(spec, x)
    np.testing.assert_array_equal(classes, (ref.forward(spec, x)[:, 0] > 0.5).astype(np.int64))
    assert 0 < classes.sum() < len(x)


@pytest.mark.parametrize("rule", ref.RULES)
def test_binary_class_zero_is_the_negated_logit_under_each_rule(rule):
    """Class 0's score -z is the logit of the same network with the last layer negated: under
    every rule its map is that network's map (the gates see the negated upstream gradient)."""
    spec = _sigmoid_spec("binary")
    last = spec[-1]
    negated = spec[:-1] + [dict(last, kernel=-last["kernel"], bias=-last["bias"], activation=None)]
    plain = spec[:-1] + [dict(last, activation=None)]
    x = ref.random_inputs(INPUT_SHAPE, batch=6, seed=SEED)
    zero, _ = ref.saliency(spec, x, rule=rule, class_index=0)
    one, _ = ref.saliency(spec, x, rule=rule, class_index=1)
    np.testing.assert_allclose(zero, ref.saliency(negated, x, rule=rule, class_index=0)[0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(one, ref.saliency(plain, x, rule=rule, class_index=0)[0], rtol=1e-12, atol=0)
    if rule == "vanilla":
        np.testing.assert_allclose(zero, -one, rtol=1e-12, atol=0)
    else:  # the guided and deconvnet gates make class 0's map more than a sign flip
        assert np.abs(zero + one).max() > 1e-3 * np.abs(one).max()


@pytest.mark.parametrize("kind", ref.SPEC_KINDS)
def test_keras_model_matches_forward_and_vanilla_gradient(kind):
    spec = ref.random_spec(kind, seed=SEED)
    x = reference_inputs(spec, batch=4, seed=SEED, margin=1e-3,
                         dtype=np.float64)
    model = ref.keras_model(spec, INPUT_SHAPE)
    expected_names = {layer["name"] for layer in spec}
    assert expected_names <= {layer.name for layer in model.layers}
    score = "probability" if ref.ends_in_softmax(spec) else "logit"
    saliency, classes = ref.saliency(spec, x, rule="vanilla", score=score)
    x_tf = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x_tf)
        output = model(x_tf, training=False)
        picked = tf.gather(output, classes, axis=1, batch_dims=1)
    assert_close_relative(output.numpy(), ref.forward(spec, x), rtol=1e-5)
    gradient = tape.gradient(picked, x_tf).numpy()
    assert_close_relative(gradient, saliency, rtol=1e-5)


def test_keras_model_logits_match_logit_saliency():
    """Gradient of the Keras pre-softmax logits equals score='logit'."""
    import keras  # pylint: disable=import-outside-toplevel

    spec = ref.random_spec("cnn", seed=SEED)
    x = reference_inputs(spec, batch=4, seed=SEED, margin=1e-3,
                         dtype=np.float64)
    model = ref.keras_model(spec, INPUT_SHAPE)
    logits_model = keras.Model(model.inputs,
                               model.get_layer("softmax").input)
    saliency, classes = ref.saliency(spec, x, rule="vanilla", score="logit")
    x_tf = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x_tf)
        logits = logits_model(x_tf, training=False)
        picked = tf.gather(logits, classes, axis=1, batch_dims=1)
    assert_close_relative(tape.gradient(picked, x_tf).numpy(), saliency,
                         rtol=1e-5)


# --------------------------------------------------------------------------
# Guided / deconvnet rules
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ref.SPEC_KINDS)
@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_rules_match_tf_custom_gradient(kind, rule):
    """An independent TF implementation of the rules agrees (float64)."""
    spec = ref.random_spec(kind, seed=SEED)
    x = reference_inputs(spec, batch=6, seed=SEED, margin=1e-6,
                         dtype=np.float64)
    for score in ("logit", "probability"):
        saliency, classes = ref.saliency(spec, x, rule=rule, score=score)
        expected = _tf_saliency(spec, x, rule=rule, score=score,
                                classes=classes)
        assert_close_relative(saliency, expected, rtol=1e-10)


def _hand_relu_network(activation_layer="relu"):
    """dense 3->3, relu (or relu6), dense 3->1; zero biases.

    With x = [1, 2, -1] the hidden pre-activations are z = x @ W1 = [3, -1, 1]
    and the output weights are v = [2, 1, -3]:
      unit 0: z > 0, v > 0  (passes every rule)
      unit 1: z < 0, v > 0  (only deconvnet ignores the forward mask)
      unit 2: z > 0, v < 0  (only vanilla lets a negative gradient through)
    """
    w1 = np.array([[1.0, -1.0, 2.0],
                   [0.5, 1.0, 1.0],
                   [-1.0, 2.0, 3.0]])
    v = np.array([[2.0], [1.0], [-3.0]])
    return [{"type": "dense", "name": "hidden", "kernel": w1,
             "bias": np.zeros(3)},
            {"type": activation_layer, "name": "act"},
            {"type": "dense", "name": "out", "kernel": v,
             "bias": np.zeros(1)}]


@pytest.mark.parametrize("rule, expected", [
    # vanilla: dh = v * [z > 0] = [2, 0, -3]; dx = W1 @ dh
    #   = [1*2 + 2*(-3), 0.5*2 + 1*(-3), -1*2 + 3*(-3)] = [-4, -2, -11]
    ("vanilla", [-4.0, -2.0, -11.0]),
    # guided: dh = v * [z > 0] * [v > 0] = [2, 0, 0]; dx = 2 * W1[:, 0]
    ("guided", [2.0, 1.0, -2.0]),
    # deconvnet: dh = v * [v > 0] = [2, 1, 0]; dx = 2*W1[:, 0] + W1[:, 1]
    #   = [2 - 1, 1 + 1, -2 + 2] = [1, 2, 0]
    ("deconvnet", [1.0, 2.0, 0.0]),
])
def test_hand_computed_relu_network(rule, expected):
    spec = _hand_relu_network()
    x = np.array([[1.0, 2.0, -1.0]])
    np.testing.assert_allclose(ref.forward(spec, x), [[3.0]])  # 3*2 + 1*(-3)
    saliency, classes = ref.saliency(spec, x, rule=rule)
    np.testing.assert_array_equal(classes, [0])
    np.testing.assert_allclose(saliency, [expected], rtol=0, atol=1e-12)


def _hand_relu6_network(fused):
    """dense 3->4, relu6, dense 4->1; zero biases; x = [1, 2, -1].

    W1 columns and resulting pre-activations z, output weights v:
      u0 = [3, 1.5, -3]  z = 9  (saturated)   v = 2
      u1 = [2, 1, 3]     z = 1  (linear)      v = 1
      u2 = [-1, 1, 2]    z = -1 (dead)        v = 1
      u3 = [1, 0, 0]     z = 1  (linear)      v = -1
    Output: relu6(z) @ v = 6*2 + 1 + 0 - 1 = 12.
    """
    w1 = np.array([[3.0, 2.0, -1.0, 1.0],
                   [1.5, 1.0, 1.0, 0.0],
                   [-3.0, 3.0, 2.0, 0.0]])
    v = np.array([[2.0], [1.0], [1.0], [-1.0]])
    hidden = {"type": "dense", "name": "hidden", "kernel": w1,
              "bias": np.zeros(4)}
    out = {"type": "dense", "name": "out", "kernel": v, "bias": np.zeros(1)}
    if fused:
        return [dict(hidden, activation="relu6"), out]
    return [hidden, {"type": "relu6", "name": "act"}, out]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rule, expected", [
    # vanilla: dh = v * [0 < z < 6] = [0, 1, 0, -1]; dx = u1 - u3 = [1, 1, 3]
    ("vanilla", [1.0, 1.0, 3.0]),
    # guided: dh = [0, 1, 0, 0] (u0 saturated passes nothing); dx = u1
    ("guided", [2.0, 1.0, 3.0]),
    # deconvnet: dh = v * [v > 0] = [2, 1, 1, 0]; dx = 2*u0 + u1 + u2
    #   = [6 + 2 - 1, 3 + 1 + 1, -6 + 3 + 2] = [7, 5, -1]
    ("deconvnet", [7.0, 5.0, -1.0]),
])
def test_hand_computed_relu6_network(fused, rule, expected):
    spec = _hand_relu6_network(fused)
    x = np.array([[1.0, 2.0, -1.0]])
    np.testing.assert_allclose(ref.forward(spec, x), [[12.0]])
    saliency, _ = ref.saliency(spec, x, rule=rule)
    np.testing.assert_allclose(saliency, [expected], rtol=0, atol=1e-12)


def test_relu_instead_of_relu6_lets_saturated_unit_through():
    """Same weights with plain ReLU: guided dh = [2, 1, 0, 0], dx = 2u0 + u1."""
    spec = _hand_relu6_network(fused=False)
    spec[1] = {"type": "relu", "name": "act"}
    saliency, _ = ref.saliency(spec, np.array([[1.0, 2.0, -1.0]]),
                               rule="guided")
    np.testing.assert_allclose(saliency, [[8.0, 4.0, -3.0]], atol=1e-12)


def test_hand_networks_match_keras_and_tf_rules():
    """The hand networks' Keras models and TF rule gradients agree too."""
    x = np.array([[1.0, 2.0, -1.0]])
    for spec in (_hand_relu_network(), _hand_relu6_network(fused=True)):
        model = ref.keras_model(spec, (3,))
        np.testing.assert_allclose(model(x.astype(np.float32)).numpy(),
                                   ref.forward(spec, x), rtol=1e-6)
        for rule in ref.RULES:
            saliency, classes = ref.saliency(spec, x, rule=rule)
            expected = _tf_saliency(spec, x, rule=rule, score="logit",
                                    classes=classes)
            np.testing.assert_allclose(saliency, expected, atol=1e-12)


@pytest.mark.parametrize("layer_type", ["relu", "relu6"])
def test_exact_kinks_follow_tensorflow_convention(layer_type):
    """At x == 0 (and x == 6 for relu6) the forward mask is closed.

    TF's ReluGrad uses [x > 0] and Relu6Grad [0 < x < 6]; deconvnet has no
    forward mask, so it passes the (positive) seed everywhere.
    """
    x = np.array([[0.0, 6.0, 3.0, -1.0]])
    spec = [{"type": layer_type}]
    expected = {
        "vanilla": [0.0, 0.0 if layer_type == "relu6" else 1.0, 1.0, 0.0],
        "deconvnet": [1.0, 1.0, 1.0, 1.0],
    }
    expected["guided"] = expected["vanilla"]
    for rule in ref.RULES:
        rows = [ref.saliency(spec, x, rule=rule, class_index=k)[0][0]
                for k in range(4)]
        np.testing.assert_array_equal(np.diag(rows), expected[rule])
        for k in range(4):
            tf_row = _tf_saliency(spec, x, rule=rule, score="logit",
                                  classes=np.array([k]))[0]
            np.testing.assert_array_equal(rows[k], tf_row)


@pytest.mark.parametrize("kind", ref.SPEC_KINDS)
def test_rules_give_different_maps_on_random_specs(kind):
    spec = ref.random_spec(kind, seed=SEED)
    x = ref.random_inputs(INPUT_SHAPE, batch=4, seed=SEED)
    maps = {rule: ref.saliency(spec, x, rule=rule)[0] for rule in ref.RULES}
    for first, second in (("guided", "vanilla"), ("guided", "deconvnet"),
                          ("vanilla", "deconvnet")):
        difference = np.abs(maps[first] - maps[second]).max()
        assert difference > 0.05 * np.abs(maps[first]).max(), (first, second)


def test_random_specs_exercise_every_relu_regime():
    """Units are negative, linear and (for relu6) saturated on random inputs."""
    spec = ref.random_spec("cnn", seed=SEED)
    x = ref.random_inputs(INPUT_SHAPE, batch=8, seed=SEED)
    z = ref.forward(spec[:4], x)  # conv2 pre-activation (before relu6)
    assert 0.2 < np.mean(z < 0) < 0.9
    assert np.mean(z > 6) > 0.02
    assert np.mean((z > 0) & (z < 6)) > 0.1


@pytest.mark.parametrize("kind", ["cnn", "residual_bn"])
def test_guided_is_zero_where_vanilla_is_zero(kind):
    """Exact zeros of vanilla mean no active path; guided only removes paths.

    (Deconvnet ignores the forward masks, so it is non-zero there.)
    """
    spec = ref.random_spec(kind, seed=SEED)
    if kind == "residual_bn":  # kill most first-layer units to get zeros
        spec[0] = dict(spec[0], bias=spec[0]["bias"] - 4.0)
    x = ref.random_inputs(INPUT_SHAPE, batch=8, seed=SEED)
    maps = {rule: ref.saliency(spec, x, rule=rule)[0] for rule in ref.RULES}
    vanilla_zero = maps["vanilla"] == 0
    assert 0.01 < vanilla_zero.mean() < 0.9
    assert np.all(maps["guided"][vanilla_zero] == 0)
    assert np.any(maps["deconvnet"][vanilla_zero] != 0)


# --------------------------------------------------------------------------
# Softmax score
# --------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ref.RULES)
def test_logit_score_is_gradient_of_pre_softmax_logit(rule):
    spec = ref.random_spec("cnn", seed=SEED)
    x = ref.random_inputs(INPUT_SHAPE, batch=4, seed=SEED)
    saliency, classes = ref.saliency(spec, x, rule=rule, score="logit")
    logits_spec = spec[:-1]
    expected, logit_classes = ref.saliency(logits_spec, x, rule=rule,
                                           class_index=classes)
    np.testing.assert_array_equal(classes, logit_classes)
    np.testing.assert_array_equal(
        classes, ref.forward(logits_spec, x).argmax(axis=-1))
    np.testing.assert_allclose(saliency, expected, rtol=1e-12, atol=0)

    probability, _ = ref.saliency(spec, x, rule=rule, score="probability")
    assert np.abs(probability - saliency).max() > 1e-3 * np.abs(
        saliency).max()


def test_fused_dense_softmax_equals_separate_softmax_layer():
    spec = ref.random_spec("cnn", seed=SEED)
    fused = spec[:-2] + [dict(spec[-2], activation="softmax")]
    x = ref.random_inputs(INPUT_SHAPE, batch=4, seed=SEED)
    np.testing.assert_allclose(ref.forward(fused, x), ref.forward(spec, x))
    for score in ref.SCORES:
        for rule in ref.RULES:
            np.testing.assert_allclose(
                ref.saliency(fused, x, rule=rule, score=score)[0],
                ref.saliency(spec, x, rule=rule, score=score)[0])
    logits, _ = ref.score_value(fused, x, score="logit")
    expected, _ = ref.score_value(spec, x, score="logit")
    np.testing.assert_allclose(logits, expected)


def test_scores_coincide_without_softmax():
    spec = ref.random_spec("mlp", seed=SEED)
    x = ref.random_inputs(INPUT_SHAPE, batch=3, seed=SEED)
    for rule in ref.RULES:
        np.testing.assert_array_equal(
            ref.saliency(spec, x, rule=rule, score="logit")[0],
            ref.saliency(spec, x, rule=rule, score="probability")[0])


# --------------------------------------------------------------------------
# API behaviour
# --------------------------------------------------------------------------

def test_saliency_shape_classes_and_batch_independence():
    spec = ref.random_spec("residual_bn", seed=SEED)
    x = ref.random_inputs(INPUT_SHAPE, batch=3, seed=SEED)
    saliency, classes = ref.saliency(spec, x)
    assert saliency.shape == x.shape
    np.testing.assert_array_equal(classes, ref.forward(spec, x).argmax(-1))
    for index in range(len(x)):
        single, single_class = ref.saliency(spec, x[index:index + 1])
        np.testing.assert_allclose(single[0], saliency[index], rtol=1e-12)
        assert single_class[0] == classes[index]
    _, fixed = ref.saliency(spec, x, class_index=2)
    np.testing.assert_array_equal(fixed, [2, 2, 2])
    per_example, chosen = ref.saliency(spec, x, class_index=[0, 1, 4])
    np.testing.assert_array_equal(chosen, [0, 1, 4])
    alone, _ = ref.saliency(spec, x[1:2], class_index=1)
    np.testing.assert_allclose(per_example[1], alone[0], rtol=1e-12)


@pytest.mark.parametrize("kwargs", [
    {"rule": "smoothgrad"}, {"score": "logits"}, {"class_index": 5},
])
def test_invalid_arguments_raise(kwargs):
    spec = ref.random_spec("mlp", seed=SEED)
    x = ref.random_inputs(INPUT_SHAPE, batch=1, seed=SEED)
    with pytest.raises(ValueError):
        ref.saliency(spec, x, **kwargs)


def test_softmax_in_the_middle_is_rejected():
    spec = ref.random_spec("mlp", seed=SEED)
    spec.insert(2, {"type": "softmax"})
    with pytest.raises(ValueError):
        ref.saliency(spec, ref.random_inputs(INPUT_SHAPE, batch=1, seed=0))


def test_random_spec_is_deterministic():
    first = ref.random_spec("cnn", seed=3)
    second = ref.random_spec("cnn", seed=3)
    other = ref.random_spec("cnn", seed=4)
    np.testing.assert_array_equal(first[0]["kernel"], second[0]["kernel"])
    assert not np.array_equal(first[0]["kernel"], other[0]["kernel"])
