"""Activations computed with a ReLU op inside that are not ReLU activations (issue 11 item 2).

hard_sigmoid (relu6(x + 3) / 6) and hard_silu (x * relu6(x + 3) / 6) keep their true gradient and
are reported as kept under their own name; ReLU(max_value=3) is a Relu (rewritten) whose clip keeps
its own gradient, so guided gives dy * [0 < x < 3] * [dy > 0]; ReLU(threshold=0.5) is Greater +
Select, no ReLU op: no site, and its true gradient dy * [x > 0.5]. Checked on both paths against
the numpy reference, whose new pieces are checked against finite differences first.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
import model_zoo
import numpy_reference as ref
from conftest import assert_close_relative, reference_inputs
from gbp_rewrite.errors import SelectionError

SPEC = model_zoo.hard_mix_spec()
KEPT_HARD_SILU = "kept: part of hard_silu, not a ReLU activation"
KEPT_HARD_SIGMOID = "kept: part of hard_sigmoid, not a ReLU activation"
# layer -> (op type, status) in the report, on both paths; 'thr' (Greater + Select) has no site.
EXPECTED_SITES = {
    "conv_hs": ("Relu6", KEPT_HARD_SILU),
    "conv_relu": ("Relu", "rewritten"),
    "cap3": ("Relu", "rewritten"),
    "fc_hsig": ("Relu6", KEPT_HARD_SIGMOID),
}
SOURCES = ["hard_mix", "hard_mix.keras", "hard_mix.h5"]


def _inputs(batch=6, dtype=np.float32, seed=5):
    return reference_inputs(SPEC, batch=batch, seed=seed, margin=1e-3, dtype=dtype)


def _finite_differences(spec, x, classes, eps=1e-6):
    flat = x.reshape(len(x), -1)
    grad = np.zeros_like(flat)
    for index in range(flat.shape[1]):
        step = np.zeros_like(flat)
        step[:, index] = eps
        plus, _ = ref.score_value(spec, (flat + step).reshape(x.shape), class_index=classes)
        minus, _ = ref.score_value(spec, (flat - step).reshape(x.shape), class_index=classes)
        grad[:, index] = (plus - minus) / (2 * eps)
    return grad.reshape(x.shape)


def test_reference_true_gradients_match_finite_differences():
    x = _inputs(batch=3, dtype=np.float64)
    saliency, classes = ref.saliency(SPEC, x, rule="vanilla")
    assert_close_relative(saliency, _finite_differences(SPEC, x, classes), rtol=1e-6)


@pytest.mark.parametrize("layer", [
    {"type": "relu", "max_value": 3.0}, {"type": "relu", "threshold": 0.5},
    {"type": "dense", "activation": "hard_sigmoid"}, {"type": "dense", "activation": "hard_silu"},
])
def test_reference_pieces_match_finite_differences_alone(layer):
    rng = np.random.default_rng(0)
    if layer["type"] == "dense":
        layer = dict(layer, kernel=rng.normal(0, 2.0, (5, 5)), bias=rng.normal(0, 1.0, 5))
    spec = [{"type": "dense", "kernel": rng.normal(0, 2.0, (4, 5)), "bias": rng.normal(0, 1.0, 5)}, layer,
            {"type": "dense", "kernel": rng.normal(0, 1.0, (5, 3)), "bias": np.zeros(3)}]
    x = rng.normal(0, 2.0, (64, 4))
    x = x[ref.kink_margin(spec, x) > 1e-3][:8]
    saliency, classes = ref.saliency(spec, x, rule="vanilla")
    assert_close_relative(saliency, _finite_differences(spec, x, classes), rtol=1e-6)
    # every piece is met on both sides of its kinks by these inputs
    z = x @ spec[0]["kernel"] + spec[0]["bias"]
    if layer["type"] == "dense":
        z = z @ layer["kernel"] + layer["bias"]
        assert (z < -3).any() and (abs(z) < 3).any() and (z > 3).any()
    else:
        kink = layer.get("max_value") or layer.get("threshold")
        assert (z > kink).any() and (z < kink).any() and (z < 0).any()


def test_capped_relu_under_guided_is_gated_on_both_sides():
    """ReLU(max_value=3), by hand: guided dy * [0 < x < 3] * [dy > 0]; deconvnet ignores the
    Relu's own mask but not the clip's, dy * [x < 3] * [dy > 0]."""
    layer = {"type": "relu", "max_value": 3.0}
    z = np.array([[-1.0, 1.0, 2.0, 4.0]])
    dy = np.array([[1.0, 1.0, -1.0, 1.0]])
    np.testing.assert_array_equal(ref._relu_backward(layer, {"z": z}, dy, {"rule": "guided"}), [[0, 1, 0, 0]])
    np.testing.assert_array_equal(ref._relu_backward(layer, {"z": z}, dy, {"rule": "vanilla"}), [[0, 1, -1, 0]])
    np.testing.assert_array_equal(ref._relu_backward(layer, {"z": z}, dy, {"rule": "deconvnet"}), [[1, 1, 0, 0]])


def test_inputs_reach_every_regime():
    """The test inputs put each activation on both sides of its kinks, or the maps prove little."""
    x = _inputs()
    _, tape = ref._forward_layers(SPEC, x.astype(np.float64))
    z = {layer.get("name"): cache["z"] for layer, cache in tape if "z" in cache}
    assert (z["conv_hs"] < -3).any() and (abs(z["conv_hs"]) < 3).any() and (z["conv_hs"] > 3).any()
    assert (z["fc_hsig"] < -3).any() and (abs(z["fc_hsig"]) < 3).any() and (z["fc_hsig"] > 3).any()
    assert (z["cap3"] < 0).any() and ((z["cap3"] > 0) & (z["cap3"] < 3)).any() and (z["cap3"] > 3).any()
    assert (z["thr"] < 0.5).any() and (z["thr"] > 0.5).any()


def _sites_by_layer(report):
    return {s.layer: (s.op_type, s.status) for s in report.sites}


@pytest.mark.parametrize("source", SOURCES)
def test_report_keeps_hard_activations_by_name(zoo, source):
    _, report = zoo.converted(source)
    assert _sites_by_layer(report) == EXPECTED_SITES
    assert len(report.sites) == 4  # one site per layer; the thresholded ReLU has none
    assert "part of hard_silu" in report.to_text()


# the .h5 file is the .keras model's twin: one rule suffices there
@pytest.mark.parametrize("source,rule", [(s, r) for s in SOURCES for r in ("guided", "deconvnet")
                                         if (s, r) != ("hard_mix.h5", "deconvnet")])
def test_saliency_equals_reference(zoo, source, rule):
    export_dir, _ = zoo.converted(source, rule=rule)
    serving = zoo.loaded(export_dir).signatures["serving_default"]
    (input_key,) = serving.structured_input_signature[1]
    x = _inputs()
    outputs = serving(**{input_key: tf.constant(x)})
    expected, classes = ref.saliency(SPEC, x, rule=rule)
    assert_close_relative(outputs["saliency"].numpy(), expected)
    np.testing.assert_array_equal(outputs["explained_class"].numpy(), classes)


def test_inspect_names_the_activation(zoo):
    info = gbp_rewrite.inspect(zoo.model("hard_mix"))
    data = info.to_dict()["sites"]
    assert [(s["op_type"], s.get("activation")) for s in data] == [
        ("Relu6", "hard_silu"), ("Relu", None), ("Relu", None), ("Relu6", "hard_sigmoid")]
    assert "(part of hard_sigmoid: kept)" in info.to_text()
    json.dumps(info.to_dict())


@pytest.mark.parametrize("source", ["hard_mix", "hard_mix.keras"])
def test_naming_a_hard_activation_layer_is_refused(zoo, source):
    with pytest.raises(SelectionError, match=r"--layers 'fc_hsig' matches no layer holding a ReLU.*conv_relu, .*cap3"):
        gbp_rewrite.convert(zoo.model(source), zoo.root / "never", layers=["fc_hsig"])


def test_model_with_only_hard_activations_is_refused_naming_them(tmp_path):
    import keras

    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(keras.layers.Dense(3, activation="hard_silu")(inputs))
    with pytest.raises(SelectionError, match=r"no ReLU or ReLU6 op to rewrite \(activations found: hard_silu x1\)"):
        gbp_rewrite.convert(keras.Model(inputs, outputs), tmp_path / "out")


def _gate_reference(module_vars, x, rule_for_inner=None):
    """The mobilenet_v3_gate module's saliency in numpy: the hard_swish keeps its true gradient,
    the shifted ReLU6 and the ReLU get guided (their upstream gradient is 1, so guided = true)."""
    w1, w2 = module_vars
    z = x @ w1
    scores = ref._activation_forward("hard_silu", z) @ w2 + np.clip(x + 3, 0, 6).sum(1, keepdims=True) \
        + np.maximum(x, 0).sum(1, keepdims=True)
    classes = scores.argmax(1)
    dh = w2[:, classes].T
    dz = ref._activation_backward("hard_silu", z, None, dh, {})
    dx = dz @ w1.T + ((x + 3 > 0) & (x + 3 < 6)) + (x > 0)
    return dx, classes


def test_mobilenet_v3_gate_is_recognised_in_a_savedmodel(zoo):
    """tf-keras MobileNetV3 writes hard_swish as x * (ReLU(6.)(x + 3.) * (1. / 6.)): that Relu6 is
    kept; a Relu6 of x + 3 with no 1/6 after it is a ReLU unit and rewritten."""
    export_dir, report = zoo.converted("mobilenet_v3_gate")
    assert {s.layer: s.status for s in report.sites} == {
        "hard_swish": KEPT_HARD_SILU, "shifted_relu6": "rewritten", "plain_relu": "rewritten"}
    loaded = zoo.loaded(zoo.model("mobilenet_v3_gate"))
    weights = [v.numpy().astype(np.float64) for v in (loaded.w1, loaded.w2)]
    x = np.random.default_rng(4).normal(0, 2.0, (6, 4)).astype(np.float32)
    outputs = zoo.loaded(export_dir).signatures["serving_default"](x=tf.constant(x))
    expected, classes = _gate_reference(weights, x.astype(np.float64))
    np.testing.assert_array_equal(outputs["explained_class"].numpy(), classes)
    assert_close_relative(outputs["saliency"].numpy(), expected)
    # had the inner Relu6 got the guided gate, the map would differ (negative upstream gradients)
    z = x.astype(np.float64) @ weights[0]
    upstream = weights[1][:, classes].T * z / 6.0
    assert ((upstream < 0) & (abs(z) < 3)).any()
