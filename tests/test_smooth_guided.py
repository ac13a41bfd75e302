"""The guided extension to smooth activations (issue 13 item 3): `--smooth_activations guided`
gives swish, GELU, mish, ELU, SELU, softplus, sigmoid, tanh, hard_sigmoid and hard_silu
dx = f'(x) * dy * [dy > 0], on the SavedModel path and the Keras path alike.

The maps are compared with the independent float64 numpy reference (numpy_reference: the
derivatives written out by hand, checked here against finite differences), on small
EfficientNet-style (swish, squeeze-and-excitation sigmoid) and ConvNeXt-style (LayerNorm, GELU)
models; the extension's map must differ from the plain gradient, and without the flag the smooth
activations keep their true gradient.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
import model_zoo
import numpy_reference as ref
from conftest import assert_close_relative, cli_command, reference_inputs, run_cli_concurrently
from gbp_rewrite.errors import OptionError, SelectionError

SHAPE = model_zoo.SMOOTH_INPUT_SHAPE
EXTENSION = "guided (smooth extension)"
SPECS = {
    "effnet": lambda: ref.efficientnet_style_spec(input_shape=SHAPE),
    "effnet_relu": lambda: ref.efficientnet_style_spec(input_shape=SHAPE, relu_head=True),
    "convnext": lambda: ref.convnext_style_spec(input_shape=SHAPE),
    "chain": lambda: ref.smooth_chain_spec(input_shape=SHAPE),
    "conv_bn_swish": lambda: ref.conv_bn_swish_spec(input_shape=SHAPE),
}
BUILDERS = {
    "effnet": lambda keras: model_zoo.efficientnet_style_keras3(keras),
    "effnet_relu": lambda keras: model_zoo.efficientnet_style_keras3(keras, relu_head=True),
    "convnext": model_zoo.convnext_style_keras3,
    "chain": model_zoo.smooth_chain_keras3,
    "conv_bn_swish": model_zoo.conv_bn_swish_keras3,
}


class Models:
    """Each model built once for the module: in memory, and as a Keras 3 export."""

    def __init__(self, root):
        self.root = root
        self._keras, self._exports, self._converted = {}, {}, {}

    def keras(self, name):
        import keras

        if name not in self._keras:
            self._keras[name] = BUILDERS[name](keras)
        return self._keras[name]

    def export(self, name):
        if name not in self._exports:
            path = self.root / "models" / name
            self.keras(name).export(str(path), verbose=False)
            self._exports[name] = path
        return self._exports[name]

    def converted(self, name, *, keras_path=False, **options):
        key = (name, keras_path, tuple(sorted(options.items())))
        if key not in self._converted:
            destination = self.root / "exports" / f"{name}-{len(self._converted)}"
            source = self.keras(name) if keras_path else self.export(name)
            self._converted[key] = (destination, gbp_rewrite.convert(source, destination, **options))
        return self._converted[key]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("smooth"))


def _saliency(export_dir, x):
    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    (key,) = signature.structured_input_signature[1]
    return signature(**{key: tf.constant(x)})["saliency"].numpy()


def _inputs(spec):
    return reference_inputs(spec, batch=6, input_shape=SHAPE)


def _gradients(report):
    return {(entry.path, entry.op_type): entry.gradient for entry in report.sites}


# ---------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("name", ref.SMOOTH + ("sigmoid",))
def test_reference_derivatives_match_finite_differences(name):
    z = np.linspace(-4.0, 4.0, 161) + 0.0123  # off the hard activations' kinks at -3, 3
    step = 1e-6
    numeric = (ref._smooth_forward(name, z + step) - ref._smooth_forward(name, z - step)) / (2 * step)
    np.testing.assert_allclose(ref._smooth_derivative(name, z), numeric, rtol=1e-6, atol=1e-8)


def test_reference_gates_the_upstream_gradient_only():
    z, dy = np.array([-1.0, 0.5, 2.0, -0.3]), np.array([1.0, -2.0, 0.5, -1.0])
    guided = ref._smooth_backward("swish", z, dy, {"smooth": "guided"})
    true = ref._smooth_backward("swish", z, dy, {"smooth": "true"})
    np.testing.assert_array_equal(guided, np.where(dy > 0, true, 0.0))
    assert np.all(true[dy < 0] != 0)  # the true gradient passes negative dy


# ---------------------------------------------------------------------------------------------
# Both paths against the reference


@pytest.mark.parametrize("keras_path", [False, True], ids=["savedmodel", "keras"])
@pytest.mark.parametrize("name", ["effnet", "convnext"])
def test_extension_matches_the_reference_and_is_not_the_gradient(models, name, keras_path):
    spec = SPECS[name]()
    export_dir, report = models.converted(name, keras_path=keras_path, smooth_activations="guided")
    x = _inputs(spec)
    got = _saliency(export_dir, x)
    want, _ = ref.saliency(spec, x, smooth_activations="guided")
    assert_close_relative(got, want, rtol=1e-5)
    plain, _ = ref.saliency(spec, x, rule="vanilla")
    assert np.max(np.abs(got - plain)) > 0.05 * np.max(np.abs(plain))  # a guided map, not the gradient
    gradients = set(_gradients(report).values())
    assert gradients == {EXTENSION}, report.to_text()
    assert all(entry.status == "rewritten" for entry in report.sites if entry.gradient == EXTENSION)
    assert "guided extension for" in report.checks["rule applied"]


def test_every_smooth_activation_and_the_sigmoid_head(models):
    """GELU (tanh form), mish, ELU, SELU, softplus, tanh, hard_silu, hard_sigmoid, swish, GELU in
    a chain, the output's sigmoid passed through (a binary classifier's head, not a hidden one)."""
    spec = SPECS["chain"]()
    export_dir, report = models.converted("chain", smooth_activations="guided")
    x = _inputs(spec)
    want, _ = ref.saliency(spec, x, smooth_activations="guided")
    # Ten float32 nonlinear layers in a row: TensorFlow's own true gradient of this chain differs
    # from the float64 reference by up to 4e-5 of an example's scale, so 1e-4 here (1e-5 above).
    assert_close_relative(_saliency(export_dir, x), want, rtol=1e-4)
    kinds = {entry.activation for entry in report.sites if entry.gradient == EXTENSION}
    assert kinds == {"gelu (tanh approximation)", "mish", "Elu", "Selu", "Softplus", "Tanh", "hard_silu",
                     "hard_sigmoid", "swish", "gelu"}
    head = [entry for entry in report.sites if entry.path.endswith("logits")]
    assert [(e.op_type, e.gradient) for e in head] == [("Sigmoid", "pass-through")]


def test_probability_score_keeps_the_output_sigmoid_true(models):
    """With score 'probability' the output's sigmoid keeps its true gradient under the extension."""
    spec = SPECS["chain"]()
    export_dir, report = models.converted("chain", smooth_activations="guided", score="probability")
    x = _inputs(spec)
    want, _ = ref.saliency(spec, x, smooth_activations="guided", score="probability")
    assert_close_relative(_saliency(export_dir, x), want, rtol=1e-4)  # the chain's float32 error, above
    (head,) = [entry for entry in report.sites if entry.path.endswith("logits")]
    assert (head.status, head.gradient) == ("kept: the explained output's Sigmoid, not a hidden activation",
                                            "true gradient")


def test_saved_custom_gradient_swish_with_a_folded_batchnorm(models):
    """Keras' swish is tf.nn.silu, whose gradient a Keras 3 export saves: with the extension its
    IdentityN passes dy to the ops inside (the gated Mul), so the BatchNorm before it folds too."""
    spec = SPECS["conv_bn_swish"]()
    export_dir, report = models.converted("conv_bn_swish", smooth_activations="guided")
    assert "batchnorm folding" in report.checks
    x = _inputs(spec)
    assert_close_relative(_saliency(export_dir, x), ref.saliency(spec, x, smooth_activations="guided")[0])
    assert [(e.activation, e.gradient) for e in report.sites] == [("swish", EXTENSION)]


def test_without_the_flag_smooth_activations_keep_their_true_gradient(models):
    spec = SPECS["effnet_relu"]()
    x = _inputs(spec)
    default_dir, default = models.converted("effnet_relu")
    extended_dir, extended = models.converted("effnet_relu", smooth_activations="guided")
    true_map, _ = ref.saliency(spec, x, smooth_activations="true")
    guided_map, _ = ref.saliency(spec, x, smooth_activations="guided")
    assert_close_relative(_saliency(default_dir, x), true_map, rtol=1e-5)
    assert_close_relative(_saliency(extended_dir, x), guided_map, rtol=1e-5)
    assert np.max(np.abs(true_map - guided_map)) > 0.05 * np.max(np.abs(true_map))
    by_kind = {}
    for entry in default.sites:
        by_kind.setdefault(entry.activation, set()).add(entry.gradient)
    assert by_kind == {"Relu": {"guided"}, "swish": {"true gradient"}, "Sigmoid": {"true gradient"}}
    assert {e.gradient for e in extended.sites if e.activation in ("swish", "Sigmoid")} == {EXTENSION}
    text = default.to_text()
    assert "[true gradient]" in text and EXTENSION not in text


def test_guided_model_in_memory_follows_the_extension(models):
    """gbp_rewrite.guided_model: the clone's eager gradient of the top logit is the reference's."""
    spec = SPECS["convnext"]()
    x = _inputs(spec)
    clone = gbp_rewrite.guided_model(models.keras("convnext"), smooth_activations="guided")
    want, classes = ref.saliency(spec, x, smooth_activations="guided")
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        score = tf.reduce_sum(clone(inputs) * tf.one_hot(classes, 4))
    assert_close_relative(tape.gradient(score, inputs).numpy(), want, rtol=1e-5)


def test_grad_cam_weights_keep_the_true_gradient_under_the_extension(models):
    """--cam with the extension: Grad-CAM's channel weights from the true gradient (the SE block's
    swish and sigmoid above the stem included), the guided saliency from the extension."""
    spec = SPECS["effnet"]()
    export_dir, _ = models.converted("effnet", smooth_activations="guided", cam_layer="stem")
    x = _inputs(spec)
    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    (key,) = signature.structured_input_signature[1]
    outputs = {k: v.numpy() for k, v in signature(**{key: tf.constant(x)}).items()}
    heat, guided, _ = ref.grad_cam(spec, x, layer="stem", smooth_activations="guided")
    assert_close_relative(outputs["gradcam"], heat)
    assert_close_relative(outputs["guided_gradcam"], guided)


def test_layer_selection_picks_smooth_activations_by_layer(models):
    _, report = models.converted("effnet", smooth_activations="guided", layers=("se_*",))
    statuses = {entry.path: (entry.status, entry.gradient) for entry in report.sites}
    assert statuses == {
        "effnet_style/stem": ("kept: not selected", "true gradient"),
        "effnet_style/se_reduce": ("rewritten", EXTENSION),
        "effnet_style/se_expand": ("rewritten", EXTENSION),
    }


# ---------------------------------------------------------------------------------------------
# Refusals


def test_keras_path_refuses_a_form_it_cannot_wrap(models, tmp_path):
    """The chain's tanh-form GELU is a lambda: the Keras path refuses rather than differ from the
    SavedModel path (which rewrites it, above)."""
    with pytest.raises(SelectionError, match=r"layer 'smooth_chain/d_gelu_tanh.*model\.export"):
        gbp_rewrite.convert(models.keras("chain"), tmp_path / "out", smooth_activations="guided")
    assert not (tmp_path / "out").exists()


def test_keras_path_refuses_a_recurrent_cell_under_the_extension(tmp_path):
    """A SimpleRNN's tanh runs in the cell's own code inside a while loop: no activation to wrap."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((5, 3), name="seq")
    hidden = keras.layers.SimpleRNN(4, name="rnn")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(hidden), name="rnn_model")
    with pytest.raises(SelectionError, match=r"layer 'rnn_model/rnn.*Tanh.*cannot give the guided extension"):
        gbp_rewrite.convert(model, tmp_path / "out", smooth_activations="guided")
    assert not (tmp_path / "out").exists()


def test_extension_with_portable_or_an_unknown_value_is_refused(models, tmp_path):
    with pytest.raises(OptionError, match="--portable"):
        gbp_rewrite.convert(models.export("effnet"), tmp_path / "a", smooth_activations="guided", portable=True)
    with pytest.raises(OptionError, match=r"unknown smooth_activations 'yes'; valid values: true, guided"):
        gbp_rewrite.convert(models.export("effnet"), tmp_path / "b", smooth_activations="yes")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# The command line


def test_command_line_flag_errors_and_report_line(models, tmp_path):
    source = str(models.export("effnet"))
    done = run_cli_concurrently({
        "extension": cli_command("convert", source, str(tmp_path / "ext"), "--rule", "guided",
                                 "--smooth_activations", "guided"),
        "default": cli_command("convert", source, str(tmp_path / "default")),
        "vanilla": cli_command("convert", source, str(tmp_path / "vanilla"), "--rule", "vanilla",
                               "--smooth_activations", "guided"),
        "help": cli_command("convert", "--help"),
    })
    ext = done["extension"]
    assert ext.returncode == 0, ext.stderr
    lines = [line for line in ext.stdout.splitlines() if line.strip().startswith("effnet_style/")]
    swish = [line for line in lines if "stem" in line and "Sigmoid" in line]
    assert swish and all(line.endswith(f"[{EXTENSION}]") and " rewritten " in line for line in swish), lines
    saved = json.loads((tmp_path / "ext" / "assets" / "gbp_rewrite_report.json").read_text())
    assert {s["gradient"] for s in saved["sites"]} == {EXTENSION}
    spec = SPECS["effnet"]()
    x = _inputs(spec)
    assert_close_relative(_saliency(tmp_path / "ext", x), ref.saliency(spec, x, smooth_activations="guided")[0])

    for key, words in (("default", ("no ReLU or ReLU6 op", "--rule vanilla", "--smooth_activations guided")),
                       ("vanilla", ("--smooth_activations guided", "only with --rule guided"))):
        result = done[key]
        assert result.returncode == 1, (key, result.stdout, result.stderr)
        error = result.stderr.strip().splitlines()
        assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr
        assert all(word in error[0] for word in words), error[0]
        assert not (tmp_path / key).exists()
    help_text = " ".join(done["help"].stdout.split())
    assert "--smooth_activations {true,guided}" in help_text and "EXTENSION of guided backprop" in help_text
