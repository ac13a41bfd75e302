"""What is explained for each way an output can end, on both paths (issue 11 items 3 and 4).

- A softmax followed by Reshape, Squeeze, ExpandDims, Identity or Cast, and a concatenation of two
  softmax heads: every softmax passes the gradient through, the saliency is d(logit_c)/dx.
- A binary sigmoid ([batch, 1]): class 1 (p > 0.5) explains z, class 0 explains -z (or p and 1 - p
  with --score probability); a multi-label sigmoid: the top logit, any of the K by explain_class.
- A two-head model explaining each head (output=).
- A softmax inside arithmetic: score logit is refused with one line (CLI exit 1, no DST left).

Each saliency is compared with the independent float64 numpy reference (tests/numpy_reference.py)
run on the logits body with the class the reference itself picks from its own probabilities.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import model_zoo
import numpy_reference as ref
from conftest import INPUT_SHAPE, assert_close_relative, cli_command, reference_inputs

import subprocess

from gbp_rewrite.selection import PASSED_THROUGH

# ---------------------------------------------------------------------------------------------
# Sources and conversions, each made once per module


@pytest.fixture(scope="module")
def body():
    """The logits body every head model shares: a 5-class MLP spec without softmax."""
    return ref.random_spec("mlp", seed=1, input_shape=INPUT_SHAPE)


@pytest.fixture(scope="module")
def x(body):
    return reference_inputs(body)


class _Heads:
    def __init__(self, root, body):
        self.root, self.body = root, body
        self.sources, self.exports = {}, {}

    def source(self, family: str, head: str):
        """family 'tf2_module' (graph path), 'keras3' (its export, graph path) or 'keras' (the
        in-memory model: the Keras path)."""
        key = (family, head)
        if key not in self.sources:
            if family == "tf2_module":
                self.sources[key] = model_zoo.head_module(self.body, INPUT_SHAPE, head, self.root / f"{family}-{head}")
            else:
                import keras

                model = model_zoo.head_keras3(keras, self.body, INPUT_SHAPE, head)
                if family == "keras3":
                    path = self.root / f"{family}-{head}"
                    model.export(str(path), verbose=False)
                    model = path
                self.sources[key] = model
        return self.sources[key]

    def converted(self, family: str, head: str, **options):
        import gbp_rewrite

        key = (family, head, tuple(sorted(options.items())))
        if key not in self.exports:
            destination = self.root / f"export-{len(self.exports)}"
            report = gbp_rewrite.convert(self.source(family, head), destination, **options)
            self.exports[key] = (destination, report, tf.saved_model.load(str(destination)))
        return self.exports[key]


@pytest.fixture(scope="module")
def heads(tmp_path_factory, body):
    return _Heads(tmp_path_factory.mktemp("heads"), body)


def _run(loaded, x, class_index=None):
    serving = loaded.signatures["serving_default"]
    (input_key,) = serving.structured_input_signature[1]
    inputs = {input_key: tf.constant(x)}
    if class_index is None:
        outputs = serving(**inputs)
    else:
        outputs = loaded.signatures["explain_class"](
            **inputs, class_index=tf.constant(np.broadcast_to(class_index, [len(x)]), tf.int64))
    return {k: v.numpy() for k, v in outputs.items()}


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference_probabilities(z, head):
    """What the head computes, in numpy float64 from the reference's logits."""
    if head == "concat":
        return np.concatenate([_softmax(z[:, :2]), _softmax(z[:, 2:])], axis=-1)
    return _softmax(z)


# ---------------------------------------------------------------------------------------------
# Softmax behind shape-only ops and concatenations


GRAPH_HEADS = ["reshape", "squeeze", "expand_dims", "identity", "cast", "concat"]
CASES = ([("tf2_module", head) for head in GRAPH_HEADS]
         + [("keras", head) for head in ("reshape", "squeeze", "identity", "concat")]
         + [("keras3", head) for head in ("squeeze", "concat")])


@pytest.mark.parametrize("family,head", CASES, ids=["-".join(c) for c in CASES])
def test_softmax_behind_shape_ops_explains_the_logit(heads, body, x, family, head):
    _, report, loaded = heads.converted(family, head)
    z = ref.forward(body, x)
    probabilities = _reference_probabilities(z, head)
    classes = probabilities.argmax(-1)
    outputs = _run(loaded, x)
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    assert_close_relative(outputs["scores" if family == "tf2_module" else "output_0"], probabilities)
    expected, _ = ref.saliency(body, x, rule="guided", class_index=classes)
    assert_close_relative(outputs["saliency"], expected)
    assert report.score_plan == "softmax logit"
    assert "passes the gradient through" in report.score_note or "pass the gradient through" in report.score_note


@pytest.mark.parametrize("rule", ["deconvnet", "vanilla"])
def test_concatenated_softmax_heads_under_each_rule(heads, body, x, rule):
    _, _, loaded = heads.converted("tf2_module", "concat", rule=rule)
    classes = np.full(len(x), 3)  # a class of the second head
    expected, _ = ref.saliency(body, x, rule=rule, class_index=classes)
    assert_close_relative(_run(loaded, x, classes)["saliency"], expected)


def test_probability_score_behind_a_reshape_is_the_softmax_value(heads, body, x):
    """--score probability keeps the softmax's true gradient: TensorFlow's own gradient of the
    source's output, computed here."""
    _, report, loaded = heads.converted("tf2_module", "reshape", score="probability")
    assert report.score_plan == "softmax probability"
    restored = tf.saved_model.load(str(heads.source("tf2_module", "reshape")))  # kept: owns the variables
    source = restored.signatures["serving_default"]
    tensor = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        score = tf.reduce_max(source(image=tensor)["scores"], axis=-1)
    expected = tape.gradient(score, tensor).numpy()  # vanilla: compare the rule's own gradient below
    outputs = _run(loaded, x)
    guided_reference, _ = ref.saliency(body + [{"type": "softmax"}], x, rule="guided", score="probability")
    assert_close_relative(outputs["saliency"], guided_reference)
    vanilla = heads.converted("tf2_module", "reshape", score="probability", rule="vanilla")[2]
    assert_close_relative(_run(vanilla, x)["saliency"], expected)


# ---------------------------------------------------------------------------------------------
# Logit impossible: a softmax inside arithmetic


@pytest.mark.parametrize("family", ["tf2_module", "keras"])
def test_softmax_inside_arithmetic_refuses_logit_in_one_line(heads, tmp_path, family):
    import gbp_rewrite
    from gbp_rewrite.errors import GbpError

    destination = tmp_path / "dst"
    with pytest.raises(GbpError, match=r"--score probability") as caught:
        gbp_rewrite.convert(heads.source(family, "scaled"), destination)
    assert "\n" not in str(caught.value) and "Softmax" in str(caught.value)
    assert not destination.exists()
    # The value itself can be explained: the true gradient of softmax * 2 + 1 (vanilla rule) is
    # twice the probability's.
    _, report, loaded = heads.converted(family, "scaled", score="probability", rule="vanilla")
    assert report.score_plan == "output value"
    x = reference_inputs(heads.body)
    classes = _softmax(ref.forward(heads.body, x)).argmax(-1)
    expected, _ = ref.saliency(heads.body + [{"type": "softmax"}], x, rule="vanilla", score="probability",
                               class_index=classes)
    outputs = _run(loaded, x)
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    assert_close_relative(outputs["saliency"], 2.0 * expected)


def test_softmax_inside_arithmetic_cli_exit_1_no_destination(heads, tmp_path):
    destination = tmp_path / "dst"
    result = subprocess.run(cli_command("convert", str(heads.source("tf2_module", "scaled")), str(destination)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--score probability" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not destination.exists()


def test_a_sigmoid_inside_the_network_leaves_the_logit_alone(heads, x):
    """swish(z) then a matrix product: the output is a logit; its Sigmoid is no output activation.
    Under the vanilla rule the saliency is TensorFlow's own gradient of the source's output."""
    _, report, loaded = heads.converted("tf2_module", "swish_dense", rule="vanilla")
    assert report.score_plan == "output value (a logit)"
    restored = tf.saved_model.load(str(heads.source("tf2_module", "swish_dense")))  # kept: owns the variables
    tensor = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        score = tf.reduce_max(restored.signatures["serving_default"](image=tensor)["scores"], axis=-1)
    assert_close_relative(_run(loaded, x)["saliency"], tape.gradient(score, tensor).numpy())


def test_plain_logits_are_explained_as_they_are(zoo):
    """An output with no final activation is the logit: score logit works, probability is refused."""
    import gbp_rewrite
    from gbp_rewrite.errors import GbpError

    _, report = zoo.converted("tf2_module@mlp")
    assert report.score_plan == "output value (a logit)"
    with pytest.raises(GbpError, match="use --score logit"):
        gbp_rewrite.convert(zoo.model("tf2_module@mlp"), zoo.root / "never", score="probability")


# ---------------------------------------------------------------------------------------------
# Two heads: each explained with output=


@pytest.mark.parametrize("family", ["tf2_module", "keras"])
def test_two_heads_each_explained(heads, body, x, family):
    z = ref.forward(body, x)
    _, report, loaded = heads.converted(family, "two_heads", output="cls")
    assert report.score_plan == "softmax logit"
    classes = _softmax(z[:, :3]).argmax(-1)
    outputs = _run(loaded, x)
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    assert_close_relative(outputs["saliency"], ref.saliency(body, x, class_index=classes)[0])

    _, report, loaded = heads.converted(family, "two_heads", output="flag")
    assert report.score_plan == "binary sigmoid logit"
    predicted = (z[:, 3] > 0).astype(np.int64)
    assert 0 < predicted.sum() < len(x), "the batch should hold both classes"
    outputs = _run(loaded, x)
    np.testing.assert_array_equal(outputs["explained_class"], predicted)
    # Score z_3 for class 1 and -z_3 for class 0: the reference's seed on unit 3 is +1 or -1.
    flag_body = body[:-1] + [dict(body[-1], kernel=body[-1]["kernel"][:, 3:4], bias=body[-1]["bias"][3:4],
                                  activation="sigmoid")]
    expected, classes = ref.saliency(flag_body, x)
    np.testing.assert_array_equal(classes, predicted)
    assert_close_relative(outputs["saliency"], expected)


# ---------------------------------------------------------------------------------------------
# Sigmoid classifiers (the zoo's "binary" and "multilabel" specs)


SIGMOID_FAMILIES = ["tf2_module", "tf1", "keras3", "keras_file"]


@pytest.mark.parametrize("family", SIGMOID_FAMILIES)
def test_binary_sigmoid_explains_the_predicted_class(zoo, family):
    spec = zoo.spec("binary")
    x = reference_inputs(spec)
    export_dir, report = zoo.converted(f"{family}@binary")
    assert report.score_plan == "binary sigmoid logit"
    outputs = _run(zoo.loaded(export_dir), x)
    expected, classes = ref.saliency(spec, x, rule="guided")
    assert 0 < classes.sum() < len(x), "the batch should hold both classes"
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    assert_close_relative(outputs["saliency"], expected)
    for cls in (0, 1):
        forced = _run(zoo.loaded(export_dir), x, cls)
        np.testing.assert_array_equal(forced["explained_class"], np.full(len(x), cls))
        assert_close_relative(forced["saliency"], ref.saliency(spec, x, rule="guided", class_index=cls)[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="class_index must be < 2"):
        _run(zoo.loaded(export_dir), x, 2)


def test_binary_class_zero_is_not_a_sign_flip_under_the_guided_rule(zoo):
    """The guided gate sees the negated upstream gradient: class 0's map is not -(class 1's map)."""
    spec = zoo.spec("binary")
    x = reference_inputs(spec)
    loaded = zoo.loaded(zoo.converted("tf2_module@binary")[0])
    one, zero = _run(loaded, x, 1)["saliency"], _run(loaded, x, 0)["saliency"]
    assert not np.allclose(zero, -one, rtol=1e-3, atol=1e-6)
    reference_one = ref.saliency(spec, x, class_index=1)[0]
    reference_zero = ref.saliency(spec, x, class_index=0)[0]
    assert not np.allclose(reference_zero, -reference_one, rtol=1e-3, atol=1e-6)
    vanilla = zoo.loaded(zoo.converted("tf2_module@binary", rule="vanilla")[0])
    np.testing.assert_allclose(_run(vanilla, x, 0)["saliency"], -_run(vanilla, x, 1)["saliency"], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["tf1", "keras_file"])
def test_binary_sigmoid_probability_explains_p_and_one_minus_p(zoo, family):
    spec = zoo.spec("binary")
    x = reference_inputs(spec)
    export_dir, report = zoo.converted(f"{family}@binary", score="probability")
    assert report.score_plan == "binary sigmoid probability"
    loaded = zoo.loaded(export_dir)
    for cls in (0, 1):
        expected = ref.saliency(spec, x, rule="guided", score="probability", class_index=cls)[0]
        assert_close_relative(_run(loaded, x, cls)["saliency"], expected)


@pytest.mark.parametrize("family", ["tf2_module", "keras_file"])
def test_multilabel_sigmoid_explains_the_top_logit_and_any_label(zoo, family):
    spec = zoo.spec("multilabel")
    x = reference_inputs(spec)
    export_dir, report = zoo.converted(f"{family}@multilabel")
    assert report.score_plan == "multi-label sigmoid logit"
    loaded = zoo.loaded(export_dir)
    expected, classes = ref.saliency(spec, x, rule="guided")
    outputs = _run(loaded, x)
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    assert_close_relative(outputs["saliency"], expected)
    for label in (0, 4):
        assert_close_relative(_run(loaded, x, label)["saliency"], ref.saliency(spec, x, class_index=label)[0])


@pytest.mark.parametrize("family", ["tf1", "keras_file"])
def test_report_says_the_output_sigmoid_passes_the_gradient_through(zoo, family):
    """The report's status of the output Sigmoid follows the score: passed through for the logit,
    its true gradient (no guided rule) for the probability; never 'kept' while the score says logit."""
    by_type = lambda report: {s.op_type: s.status for s in report.sites}  # noqa: E731
    assert by_type(zoo.converted(f"{family}@binary")[1])["Sigmoid"] == PASSED_THROUGH
    probability = zoo.converted(f"{family}@binary", score="probability")[1]
    assert by_type(probability)["Sigmoid"] == "kept: no guided rule for Sigmoid"


def test_report_names_the_score_plan(zoo):
    _, report = zoo.converted("keras_file@binary")
    assert "score plan    : binary sigmoid logit" in report.to_text()
    assert report.to_dict()["score_plan"] == "binary sigmoid logit"


def test_explain_scores_a_binary_classifier_by_class(zoo, tmp_path):
    """`explain` on a binary sigmoid export: --class 1 and 0 are accepted (2 is not), and the
    recorded score is p for class 1 and 1 - p for class 0."""
    import json

    import gbp_rewrite
    from conftest import REPO
    from gbp_rewrite.errors import OptionError

    export_dir, _ = zoo.converted("tf2_module@binary")
    image = sorted((REPO / "testdata" / "images").glob("*.png"))[:1]
    probabilities = {}
    for cls in (1, 0):
        out = tmp_path / f"class{cls}"
        gbp_rewrite.explain(export_dir, image, out_dir=out, class_index=cls)
        (record,) = json.loads((out / "summary.json").read_text())["images"]
        assert record["class"] == cls
        probabilities[cls] = record["score"]
    assert probabilities[0] == pytest.approx(1.0 - probabilities[1], abs=1e-6)
    with pytest.raises(OptionError, match="2 classes"):
        gbp_rewrite.explain(export_dir, image, out_dir=tmp_path / "class2", class_index=2)
