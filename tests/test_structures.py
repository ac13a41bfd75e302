"""Model structures the issue names: nested, shared, ReLU6 saturation, residual, BatchNorm,
multi-input, multi-output, half precision; and named-layer selection changing only named sites."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
import model_zoo
import numpy_reference as ref
from conftest import assert_close_relative, reference_inputs
from gbp_rewrite.errors import SelectionError, SignatureError


def _serve(zoo, export_dir, **inputs):
    signature = zoo.loaded(export_dir).signatures["serving_default"]
    return {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def _statuses(report):
    return [(site.layer, site.status) for site in report.sites]


# ---------------------------------------------------------------------------------------------
# A hand-weighted ReLU6 model with a known answer


@pytest.mark.parametrize("rule,expected", [
    ("vanilla", [0.0, 2.0, -3.0]),
    ("guided", [0.0, 2.0, 0.0]),
    ("deconvnet", [8.0, 2.0, 0.0]),
])
def test_relu6_saturated_unit_passes_no_gradient(zoo, rule, expected):
    export_dir, _ = zoo.converted("relu6_hand", rule=rule)
    outputs = _serve(zoo, export_dir, x=np.array([[1.0, 0.5, 0.5]], np.float32))
    np.testing.assert_allclose(outputs["saliency"], [expected], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(outputs["explained_class"], [0])


# ---------------------------------------------------------------------------------------------
# Named-layer selection, checked numerically against the numpy reference with per-layer rules


@pytest.mark.parametrize("family", ["keras3", "tf1"])
@pytest.mark.parametrize("options,layer_rules", [
    ({"layers": ["relu1"]}, {"relu1": "guided"}),
    ({"layers": ["relu6*"]}, {"relu6_2": "guided"}),
    ({"exclude_layers": ["relu1"]}, {"relu6_2": "guided"}),
])
def test_named_selection_changes_only_named_sites(zoo, family, options, layer_rules):
    spec = zoo.spec("cnn")
    export_dir, report = zoo.converted(f"{family}@cnn", **options)
    rewritten = {site.layer for site in report.sites if site.rewritten}
    assert rewritten == set(layer_rules)
    x = reference_inputs(spec)
    expected, _ = ref.saliency(spec, x, rule="vanilla", layer_rules=layer_rules)
    (input_key,) = [k for k in zoo.loaded(export_dir).signatures["serving_default"].structured_input_signature[1]]
    assert_close_relative(_serve(zoo, export_dir, **{input_key: x})["saliency"], expected)


def test_selection_inside_a_residual_block(zoo):
    spec = zoo.spec("residual_bn")
    export_dir, report = zoo.converted("keras3@residual_bn", layers=["res_conv1"])
    assert [s.layer for s in report.sites if s.rewritten] == ["res_conv1"]
    x = reference_inputs(spec)
    expected, _ = ref.saliency(spec, x, rule="vanilla", layer_rules={"res_conv1": "guided"})
    (input_key,) = zoo.loaded(export_dir).signatures["serving_default"].structured_input_signature[1]
    assert_close_relative(_serve(zoo, export_dir, **{input_key: x})["saliency"], expected)


# ---------------------------------------------------------------------------------------------
# The kitchen-sink Keras 3 model: nested model, shared layer, ReLU6 spellings, residual, BN


SINK_LAYERS = ["shared", "shared", "inner_relu6", "res_conv", "act6", "fc_relu"]


def test_every_relu_of_the_kitchen_sink_is_found_and_named(zoo):
    info = gbp_rewrite.inspect(zoo.model("sink"))
    assert [s.layer for s in info.sites] == SINK_LAYERS
    assert [s.op_type for s in info.sites] == ["Relu", "Relu", "Relu6", "Relu", "Relu6", "Relu"]
    assert info.sites[2].path[-2:] == ("block", "inner_relu6")
    _, report = zoo.converted("sink")
    assert all(site.rewritten for site in report.sites)
    assert "pass" in report.score_note and "Softmax" in report.score_note


@pytest.mark.parametrize("layers,expected", [
    (["shared"], {"shared"}),
    (["block"], {"inner_relu6"}),
    (["res*", "fc_*"], {"res_conv", "fc_relu"}),
])
def test_kitchen_sink_selection(zoo, layers, expected):
    _, report = zoo.converted("sink", layers=layers)
    assert {s.layer for s in report.sites if s.rewritten} == expected
    statuses = dict(_statuses(report))
    assert all(status == "kept: not selected" for layer, status in statuses.items() if layer not in expected)
    if "shared" in expected:  # both call sites of the shared layer
        assert [s.status for s in report.sites if s.layer == "shared"] == ["rewritten", "rewritten"]


def test_kitchen_sink_selection_changes_the_saliency(zoo):
    x = np.random.default_rng(0).uniform(0, 1, (4, 12, 12, 3)).astype(np.float32)
    maps = {
        name: _serve(zoo, zoo.converted("sink", **options)[0], image=x)["saliency"]
        for name, options in {
            "all": {}, "vanilla": {"rule": "vanilla"}, "shared": {"layers": ["shared"]},
        }.items()
    }
    for a, b in [("all", "vanilla"), ("shared", "vanilla"), ("shared", "all")]:
        assert not np.allclose(maps[a], maps[b], rtol=1e-3, atol=1e-7), f"{a} == {b}"


def test_unknown_layer_lists_layers_with_relus(zoo):
    with pytest.raises(SelectionError) as error:
        gbp_rewrite.convert(zoo.model("sink"), zoo.root / "never", layers=["conv9"])
    message = str(error.value)
    assert "'conv9'" in message and "shared" in message and "inner_relu6" in message
    assert not (zoo.root / "never").exists()


def test_excluding_everything_is_an_error(zoo):
    with pytest.raises(SelectionError, match="rewrites nothing"):
        gbp_rewrite.convert(zoo.model("sink"), zoo.root / "never", layers=["shared"], exclude_layers=["shared"])


def test_no_relu_names_the_activations_found(zoo):
    with pytest.raises(SelectionError) as error:
        gbp_rewrite.convert(zoo.model("no_relu"), zoo.root / "never")
    assert "LeakyRelu" in str(error.value) and "Sigmoid" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Multi-input and multi-output


def test_multi_io_requires_choosing_the_output(zoo):
    with pytest.raises(SignatureError, match="--output"):
        gbp_rewrite.convert(zoo.model("multi_io"), zoo.root / "never")


@pytest.fixture(scope="module")
def multi_io_inputs():
    rng = np.random.default_rng(5)
    return {
        "image": rng.uniform(0, 1, (3, 8, 8, 3)).astype(np.float32),
        "meta": rng.normal(0, 1, (3, 4)).astype(np.float32),
        "flag": np.array([[0], [1], [2]], np.int32),
    }


def test_multi_io_saliency_per_float_input_equals_the_true_gradient(zoo, multi_io_inputs):
    """With rule vanilla and score probability the saliency is TensorFlow's own gradient of the
    source model, an independent reference for the multi-input plumbing."""
    export_dir, report = zoo.converted("multi_io", output="cls", rule="vanilla", score="probability")
    assert report.saliency_outputs == {"saliency_image": "image", "saliency_meta": "meta"}
    outputs = _serve(zoo, export_dir, **multi_io_inputs)
    assert set(outputs) == {"cls", "box", "saliency_image", "saliency_meta", "explained_class"}
    source = zoo.loaded(zoo.model("multi_io")).signatures["serving_default"]
    tensors = {k: tf.constant(v) for k, v in multi_io_inputs.items()}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([tensors["image"], tensors["meta"]])
        probabilities = source(**tensors)["cls"]
        score = tf.reduce_max(probabilities, axis=-1)
    for key, name in report.saliency_outputs.items():
        assert_close_relative(outputs[key], tape.gradient(score, tensors[name]).numpy())
    np.testing.assert_array_equal(outputs["explained_class"], np.argmax(outputs["cls"], -1))


def test_multi_io_guided_on_the_second_output(zoo, multi_io_inputs):
    export_dir, report = zoo.converted("multi_io", output="box")
    assert "not Softmax" in report.score_note
    guided = _serve(zoo, export_dir, **multi_io_inputs)
    plain = _serve(zoo, zoo.converted("multi_io", output="box", rule="vanilla")[0], **multi_io_inputs)
    assert np.all(np.isfinite(guided["saliency_image"]))
    assert not np.allclose(guided["saliency_meta"], plain["saliency_meta"], rtol=1e-3, atol=1e-7)
    np.testing.assert_array_equal(guided["explained_class"], np.argmax(guided["box"], -1))


def test_integer_only_input_is_refused_with_advice(zoo):
    with pytest.raises(SignatureError) as error:
        gbp_rewrite.convert(zoo.model("int_input"), zoo.root / "never")
    message = str(error.value)
    assert "tokens: int32" in message and "float input" in message and "embeddings" in message


# ---------------------------------------------------------------------------------------------
# Half precision keeps its dtype and computes the guided saliency, to float16 precision

# Inputs at least this far from every ReLU kink: float16 rounding (~1e-3 relative) cannot flip a mask.
HALF_MARGIN = {"float16": 0.05, "mixed_float16": 0.01}
HALF_RTOL = 5e-3  # of the largest |saliency|: a few float16 ulps; the other rules differ by ~100%


def test_float16_model_keeps_float16(zoo):
    export_dir, _ = zoo.converted("float16")
    spec = model_zoo.float16_spec()
    x = reference_inputs(spec, batch=4, margin=HALF_MARGIN["float16"], dtype=np.float16)
    outputs = _serve(zoo, export_dir, image=x)
    assert outputs["saliency"].dtype == np.float16
    assert np.all(np.isfinite(outputs["saliency"])) and np.any(outputs["saliency"] != 0)
    expected, classes = ref.saliency(spec, x.astype(np.float64))
    assert_close_relative(outputs["saliency"], expected, rtol=HALF_RTOL)
    np.testing.assert_array_equal(outputs["explained_class"], classes)


def test_mixed_float16_keras_model(zoo):
    """The export computes in float16, the numpy reference in float64 with the model's float32
    weights: agreement to HALF_RTOL shows the export's saliency is this model's guided saliency
    up to float16 rounding (vanilla and deconvnet maps are far outside that tolerance)."""
    import keras

    export_dir, report = zoo.converted("mixed_float16")
    assert len(report.rewritten) == 2
    model = model_zoo.mixed_float16_keras3(keras)  # the zoo's model again: same seed, same weights
    spec = model_zoo.keras_spec(model)
    # conv -> ReLU -> ReLU6 has its kinks where the conv output is 0 or 6: a fused relu6 has the same
    # ones (the ReLU6's input is exactly 0 after the ReLU, in every precision, so not a kink).
    kinks = [dict(spec[0], activation="relu6")]
    x = reference_inputs(kinks, batch=4, margin=HALF_MARGIN["mixed_float16"])
    outputs = _serve(zoo, export_dir, image=x)
    assert outputs["saliency"].dtype == np.float32
    assert np.all(np.isfinite(outputs["saliency"])) and np.any(outputs["saliency"] != 0)
    assert_close_relative(outputs["output_0"], model(x, training=False).numpy(), rtol=1e-3)  # same weights
    expected, classes = ref.saliency(spec, x.astype(np.float64))
    assert_close_relative(outputs["saliency"], expected, rtol=HALF_RTOL)
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    for rule in ("vanilla", "deconvnet"):
        other, _ = ref.saliency(spec, x.astype(np.float64), rule=rule)
        assert np.max(np.abs(outputs["saliency"] - other)) > 10 * HALF_RTOL * np.max(np.abs(other)), rule
