"""The exported signature agrees with the independent numpy backprop (tests/numpy_reference.py).

Each spec is built as a Keras 3 export, a tf-keras SavedModel, a TF1 SavedModelBuilder graph and a
TF2 tf.Module with nested tf.functions, converted, reloaded and run; the saliency must equal the
numpy reference's to 1e-5 relative, for every rule and both scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import numpy_reference as ref
from conftest import assert_close_relative, reference_inputs

pytestmark = pytest.mark.oldest

CASES = (
    [("keras3", kind, rule) for kind in ref.SPEC_KINDS for rule in ref.RULES]
    + [(family, "cnn", rule) for family in ("tf_keras", "tf1", "tf2_module") for rule in ref.RULES]
    + [("tf1", "residual_bn", "guided"), ("tf2_module", "residual_bn", "guided"), ("tf_keras", "mlp", "guided")]
)


def _explain(zoo, export_dir, x, *, class_index=None):
    signatures = zoo.loaded(export_dir).signatures
    serving = signatures["serving_default"]
    (input_key,) = serving.structured_input_signature[1]
    if class_index is None:
        return serving(**{input_key: tf.constant(x)})
    return signatures["explain_class"](**{input_key: tf.constant(x)}, class_index=tf.constant(class_index, tf.int64))


@pytest.mark.parametrize("family,kind,rule", CASES, ids=["-".join(c) for c in CASES])
def test_saliency_equals_numpy_reference(zoo, family, kind, rule):
    spec = zoo.spec(kind)
    export_dir, report = zoo.converted(f"{family}@{kind}", rule=rule)
    x = reference_inputs(spec)
    outputs = _explain(zoo, export_dir, x)
    expected, classes = ref.saliency(spec, x, rule=rule, score="logit")
    assert_close_relative(outputs["saliency"].numpy(), expected)
    np.testing.assert_array_equal(outputs["explained_class"].numpy(), classes)
    (prediction_key,) = [k for k in outputs if k not in ("saliency", "explained_class")]
    assert_close_relative(outputs[prediction_key].numpy(), ref.forward(spec, x))
    assert report.rewritten, "the conversion rewrote nothing"


@pytest.mark.parametrize("family", ["keras3", "tf1"])
def test_probability_score_equals_reference(zoo, family):
    spec = zoo.spec("cnn")
    export_dir, report = zoo.converted(f"{family}@cnn", score="probability")
    assert "true softmax gradient" in report.score_note
    x = reference_inputs(spec)
    expected, _ = ref.saliency(spec, x, rule="guided", score="probability")
    assert_close_relative(_explain(zoo, export_dir, x)["saliency"].numpy(), expected)
    logit_dir, _ = zoo.converted(f"{family}@cnn")
    assert not np.allclose(_explain(zoo, logit_dir, x)["saliency"].numpy(), expected, rtol=1e-3, atol=0)


def test_explain_class_equals_reference_for_other_classes(zoo):
    spec = zoo.spec("cnn")
    export_dir, _ = zoo.converted("keras3@cnn")
    x = reference_inputs(spec)
    classes = np.arange(len(x)) % 5
    expected, _ = ref.saliency(spec, x, rule="guided", class_index=classes)
    outputs = _explain(zoo, export_dir, x, class_index=classes)
    assert_close_relative(outputs["saliency"].numpy(), expected)
    np.testing.assert_array_equal(outputs["explained_class"].numpy(), classes)


@pytest.mark.parametrize("kind", ref.SPEC_KINDS)
def test_rules_differ_from_each_other(zoo, kind):
    spec = zoo.spec(kind)
    x = reference_inputs(spec)
    maps = {rule: _explain(zoo, zoo.converted(f"keras3@{kind}", rule=rule)[0], x)["saliency"].numpy() for rule in ref.RULES}
    for a, b in [("guided", "vanilla"), ("guided", "deconvnet"), ("deconvnet", "vanilla")]:
        difference = np.max(np.abs(maps[a] - maps[b])) / np.max(np.abs(maps[b]))
        assert difference > 1e-2, f"{a} and {b} saliency maps are (nearly) equal on {kind}"


def test_guided_is_not_the_plain_gradient_of_the_source(zoo):
    """Guards the silent failure mode: a 'guided' map that is just the gradient of the same score
    (the top class's logit), as a rule that never reached the graph would give."""
    spec = zoo.spec("cnn")
    x = reference_inputs(spec)
    plain, _ = ref.saliency(spec, x, rule="vanilla", score="logit")
    guided = _explain(zoo, zoo.converted("keras3@cnn")[0], x)["saliency"].numpy()
    assert not np.allclose(guided, plain, rtol=1e-2, atol=1e-6)
