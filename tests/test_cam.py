"""convert --cam: gradcam and guided_gradcam against the float64 numpy reference (numpy_reference.grad_cam).

The model has a ReLU in the head above the Grad-CAM layer whose upstream gradient is negative for
some units, so Grad-CAM weights from guided gradients would differ (test_guided_head_would_differ
proves the reference tells them apart on these inputs). Built flat and with a nested backbone, on
the Keras path and the graph path (Keras 3 export, TF1 graph, tf-keras SavedModel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
import model_zoo
import numpy_reference as ref
from conftest import INPUT_SHAPE, assert_close_relative, reference_inputs
from gbp_rewrite.errors import OptionError, SignatureError


def cam_spec(seed: int = 7):
    """conv1 relu, max-pool, conv2 relu (the Grad-CAM layer, 4x4), gap, fc relu, logits softmax."""
    rng = np.random.default_rng(seed)
    return [
        ref._random_conv(rng, "conv1", 3, 4, activation="relu"),
        {"type": "maxpool", "name": "pool1", "pool": 2, "strides": 2},
        ref._random_conv(rng, "conv2", 4, 6, activation="relu"),
        {"type": "gap", "name": "gap"},
        ref._random_dense(rng, "fc", 6, 6, activation="relu"),
        ref._random_dense(rng, "logits", 6, 5, gain=2.0),
        {"type": "softmax", "name": "softmax"},
    ]


SPEC = cam_spec()
BACKBONE = 3  # layers conv1, pool1, conv2 form the nested backbone


def nested_keras_model(spec):
    """The same function with conv1..conv2 inside a nested functional model 'backbone'."""
    import keras

    inner_input = keras.Input(shape=INPUT_SHAPE)
    backbone = keras.Model(inner_input, ref._keras_layers(keras, spec[:BACKBONE], inner_input), name="backbone")
    outer_input = keras.Input(shape=INPUT_SHAPE, name="image")
    outputs = ref._keras_layers(keras, spec[BACKBONE:], backbone(outer_input))
    return keras.Model(outer_input, outputs, name="outer")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Source models by case name, built on first use."""
    root = tmp_path_factory.mktemp("cam_sources")
    built = {}

    def source(case: str):
        if case not in built:
            if case == "keras_path":
                built[case] = ref.keras_model(SPEC, INPUT_SHAPE)
            elif case == "keras_path_nested":
                built[case] = nested_keras_model(SPEC)
            elif case == "keras3_nested":
                built[case] = root / case
                nested_keras_model(SPEC).export(str(root / case), verbose=False)
            else:
                built[case] = model_zoo.FAMILIES[case](SPEC, INPUT_SHAPE, root / case)
        return built[case]

    return source


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory):
    """(export dir, report) by (case, options), converted once."""
    root = tmp_path_factory.mktemp("cam_exports")
    done = {}

    def export(case: str, **options):
        key = (case, tuple(sorted(options.items())))
        if key not in done:
            destination = root / f"{case}-{len(done)}"
            done[key] = (destination, gbp_rewrite.convert(sources(case), destination, **options))
        return done[key]

    return export


def _run(export_dir: Path, x: np.ndarray, **extra) -> dict[str, np.ndarray]:
    signature = tf.saved_model.load(str(export_dir)).signatures["explain_class" if extra else "serving_default"]
    (key,) = [k for k in signature.structured_input_signature[1] if k != "class_index"]
    extra = {k: tf.constant(v, tf.int64) for k, v in extra.items()}
    return {k: v.numpy() for k, v in signature(**{key: tf.constant(x)}, **extra).items()}


CASES = ["keras_path", "keras_path_nested", "keras3", "keras3_nested", "tf1", "tf_keras"]
LAYER = {"keras_path_nested": "backbone/conv2", "keras3_nested": "backbone/conv2"}


@pytest.mark.parametrize("case", CASES)
def test_gradcam_equals_numpy_reference(exports, case):
    export_dir, report = exports(case, cam=True)
    x = reference_inputs(SPEC)
    outputs = _run(export_dir, x)
    heat, guided, classes = ref.grad_cam(SPEC, x, layer="conv2")
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    assert outputs["gradcam"].dtype == np.float32 and outputs["gradcam"].shape == x.shape[:3]
    assert_close_relative(outputs["gradcam"], heat)
    assert outputs["guided_gradcam"].shape == x.shape and outputs["guided_gradcam"].dtype == x.dtype
    assert_close_relative(outputs["guided_gradcam"], guided)
    expected_saliency, _ = ref.saliency(SPEC, x)
    assert_close_relative(outputs["saliency"], expected_saliency)
    assert report.checks["grad-cam layer"] == f"layer '{LAYER.get(case, 'conv2')}', output [?, 4, 4, 6]"


@pytest.mark.parametrize("case", ["keras3", "keras_path"])
def test_explain_class_gradcam_equals_reference_for_other_classes(exports, case):
    """explain_class with a class that is not the top one: its own Grad-CAM (the reference's for
    that class), not the top class's map again."""
    export_dir, _ = exports(case, cam=True)
    x = reference_inputs(SPEC)
    top = ref.forward(SPEC, x).argmax(-1)
    classes = (top + 2) % 5
    outputs = _run(export_dir, x, class_index=classes)
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    heat, guided, _ = ref.grad_cam(SPEC, x, layer="conv2", class_index=classes)
    assert_close_relative(outputs["gradcam"], heat)
    assert_close_relative(outputs["guided_gradcam"], guided)
    top_outputs = _run(export_dir, x)
    np.testing.assert_array_equal(top_outputs["explained_class"], top)
    differs = np.abs(outputs["gradcam"] - top_outputs["gradcam"]).reshape(len(x), -1).max(axis=1)
    assert np.all(differs > 0.05), f"the other class's map is the top class's: {differs}"
    # the reference agrees that the maps differ (the comparison above has power)
    top_heat, _, _ = ref.grad_cam(SPEC, x, layer="conv2")
    assert_close_relative(top_outputs["gradcam"], top_heat)


def test_guided_head_would_differ():
    """The test above has power: Grad-CAM with guided head gradients gives other maps here."""
    x = reference_inputs(SPEC)
    true_heat, _, _ = ref.grad_cam(SPEC, x, layer="conv2")
    guided_heat, _, _ = ref.grad_cam(SPEC, x, layer="conv2", head_rule="guided")
    assert np.max(np.abs(true_heat - guided_heat)) > 0.05


def test_paths_agree(exports):
    x = reference_inputs(SPEC, seed=11)
    keras_outputs = _run(exports("keras_path", cam=True)[0], x)
    graph_outputs = _run(exports("keras3", cam=True)[0], x)
    for key in ("gradcam", "guided_gradcam", "saliency"):
        np.testing.assert_allclose(keras_outputs[key], graph_outputs[key], rtol=0, atol=1e-5)


def test_saliency_unchanged_by_cam(exports):
    x = reference_inputs(SPEC, seed=5)
    with_cam = _run(exports("keras3", cam=True)[0], x)
    without = _run(exports("keras3")[0], x)
    assert "gradcam" not in without
    np.testing.assert_allclose(with_cam["saliency"], without["saliency"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(with_cam["output_0"], without["output_0"])


@pytest.mark.parametrize("case,cam_layer,expected", [
    ("keras3", "pool1", "layer 'pool1', output [?, 4, 4, 4]"),
    ("keras_path", "conv1", "layer 'conv1', output [?, 8, 8, 4]"),
    ("tf1", "conv1", "layer 'conv1', output [?, 8, 8, 4]"),
    ("tf_keras", "pool*", "layer 'pool1', output [?, 4, 4, 4]"),
    ("keras3_nested", "backbone", "layer 'backbone/conv2', output [?, 4, 4, 6]"),
])
def test_cam_layer_chooses_the_named_layer(exports, case, cam_layer, expected):
    export_dir, report = exports(case, cam_layer=cam_layer)
    assert report.checks["grad-cam layer"] == expected
    if cam_layer == "conv1":
        x = reference_inputs(SPEC)
        heat, _, _ = ref.grad_cam(SPEC, x, layer="conv1")
        assert_close_relative(_run(export_dir, x)["gradcam"], heat)


def test_unknown_cam_layer_is_an_error_listing_the_layers(sources, tmp_path):
    with pytest.raises(OptionError, match=r"--cam_layer 'fc' names no layer .*; such layers: conv1, pool1, conv2$"):
        gbp_rewrite.convert(sources("keras3"), tmp_path / "out", cam_layer="fc")
    assert not (tmp_path / "out").exists()


def test_model_without_feature_maps_is_an_error_naming_the_flag(tmp_path):
    spec = ref.random_spec("mlp", seed=1, input_shape=INPUT_SHAPE)
    source = model_zoo.spec_keras3(spec, INPUT_SHAPE, tmp_path / "mlp")
    with pytest.raises(SignatureError, match="no 4-D activation .* name one with --cam_layer"):
        gbp_rewrite.convert(source, tmp_path / "out", cam=True)
    assert not (tmp_path / "out").exists()


def test_non_image_input_is_refused(tmp_path):
    import keras

    inputs = keras.Input((6,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(3, activation="relu")(inputs))
    with pytest.raises(SignatureError, match=r"--cam needs an image input .*features: float32 \[\?, 6\]"):
        gbp_rewrite.convert(model, tmp_path / "out", cam=True)


NESTED_REFUSAL = (r"^--cam: the layers above '\S+' are computed by nested functions \(.+\), whose true "
                  r"gradient TensorFlow cannot build beside the guided one; ")


def test_nested_function_head_is_refused(sources, tmp_path):
    """A tf.Module with a tf.function per layer: every layer above the default (last) one is a
    nested call, so no --cam_layer helps; the error says what does."""
    with pytest.raises(SignatureError, match=NESTED_REFUSAL + r"convert the Keras model itself or its Keras 3 "
                       r"export \(model.export\(\): one traced function\), or convert without --cam$") as info:
        gbp_rewrite.convert(sources("tf2_module"), tmp_path / "out", cam=True)
    assert "\n" not in str(info.value) and "gbp_source" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_nested_function_head_is_refused_in_one_line_by_the_cli(sources, tmp_path):
    import subprocess

    from conftest import cli_command

    result = subprocess.run(cli_command("convert", sources("tf2_module"), tmp_path / "out", "--cam"),
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "nested functions" in errors[0] and "convert without --cam" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


class _BlockInAFunction(tf.Module):
    """SPEC in one tf.function, except its layer 'conv2', a nested tf.function `block`: the
    Grad-CAM head above a layer below conv2 holds a nested call; above conv2 it does not."""

    def __init__(self):
        super().__init__(name="block_in_a_function")
        self.weights = {f"{layer['name']}_{key}": tf.Variable(np.asarray(layer[key], np.float32))
                        for layer in SPEC for key in model_zoo._weight_keys(layer)}

    def _weight(self, layer, key):
        return self.weights[f"{layer['name']}_{key}"]

    @tf.function
    def block(self, x):
        return model_zoo._apply([SPEC[2]], x, self._weight)

    @tf.function(input_signature=[tf.TensorSpec([None, *INPUT_SHAPE], tf.float32, name="image")])
    def serve(self, image):
        x = image
        for layer in SPEC:
            x = self.block(x) if layer["name"] == "conv2" else model_zoo._apply([layer], x, self._weight)
        return {"scores": x}


def test_nested_function_below_the_cam_layer_is_fine_and_above_it_names_the_way_out(tmp_path):
    """The inlined body keeps the nested call's own gradient (the loader's), so the guided rule
    applies inside it: without it tf.gradients falls back to SymbolicGradient, whose true ReLU
    gradient made conv2 'off the explained path' and the saliency wrong."""
    assert SPEC[2]["name"] == "conv2"
    module = _BlockInAFunction()
    tf.saved_model.save(module, str(tmp_path / "source"), signatures={"serving_default": module.serve})
    # the default layer is the nested call's output (conv2): its head is inline ops
    report = gbp_rewrite.convert(tmp_path / "source", tmp_path / "export", cam=True)
    assert report.checks["grad-cam layer"] == "layer 'StatefulPartitionedCall', output [?, 4, 4, 6]"
    assert {site.path: site.status for site in report.sites}["conv2"] == "rewritten"
    x = reference_inputs(SPEC)
    outputs = _run(tmp_path / "export", x)
    heat, guided, _ = ref.grad_cam(SPEC, x, layer="conv2")
    assert_close_relative(outputs["gradcam"], heat)
    assert_close_relative(outputs["guided_gradcam"], guided)
    assert_close_relative(outputs["saliency"], ref.saliency(SPEC, x)[0])  # guided through the nested call
    # conv1's head holds the call: refused, naming the one later layer whose head does not
    with pytest.raises(SignatureError, match=NESTED_REFUSAL + r"name a later layer with --cam_layer "
                       r"\(StatefulPartitionedCall\)$"):
        gbp_rewrite.convert(tmp_path / "source", tmp_path / "refused", cam_layer="conv1")
    assert not (tmp_path / "refused").exists()


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_cam_export(tmp_path_factory):
    destination = tmp_path_factory.mktemp("shapes_cam") / "export"
    report = gbp_rewrite.convert(REPO / "testdata" / "shapes_cnn", destination, cam=True)
    return destination, report


def test_explain_writes_and_names_the_cam_pictures(shapes_cam_export, tmp_path):
    import csv
    import json

    export_dir, _ = shapes_cam_export
    images = [str(REPO / "testdata" / "images" / name) for name in ("circle_0.png", "cross_0.png")]
    summary = gbp_rewrite.explain(export_dir, images, out_dir=tmp_path / "out")
    assert summary.explained == 2 and not summary.failed
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    for row, entry, stem in zip(rows, record["images"], ("circle_0", "cross_0")):
        for kind in ("gradcam", "guided_gradcam"):
            assert row[kind] == entry["outputs"][kind] == f"{stem}_{kind}.png"
            picture = tf.io.decode_png((tmp_path / "out" / row[kind]).read_bytes()).numpy()
            assert picture.shape[-1] == 3 and picture.std() > 0  # a picture, not a blank
    # the Grad-CAM heat is over the image at its own size, as the overlay
    overlay = tf.io.decode_png((tmp_path / "out" / "circle_0_overlay.png").read_bytes())
    heat = tf.io.decode_png((tmp_path / "out" / "circle_0_gradcam.png").read_bytes())
    assert overlay.shape == heat.shape


@pytest.mark.parametrize("family", ["keras3", "tf1"])
def test_gradcam_over_a_residual_block_with_folded_batchnorm(zoo, family):
    """The graph path's folded twin (BatchNorm folded into the convolution) and a residual Add."""
    spec = zoo.spec("residual_bn")
    export_dir, report = zoo.converted(f"{family}@residual_bn", cam=True)
    assert report.checks["grad-cam layer"] == "layer 'add', output [?, 6, 6, 4]"
    x = reference_inputs(spec)
    outputs = _run(export_dir, x)
    heat, guided, _ = ref.grad_cam(spec, x, layer="add")
    assert_close_relative(outputs["gradcam"], heat)
    assert_close_relative(outputs["guided_gradcam"], guided)


def test_report_lists_the_cam_outputs_the_export_has(shapes_cam_export):
    """The report's signature layout names gradcam and guided_gradcam, as the saved signatures
    return them (the plan's cam outputs, not its binary flag, carry them)."""
    export_dir, report = shapes_cam_export
    loaded = tf.saved_model.load(str(export_dir))
    for key in ("serving_default", "explain_class"):
        saved = set(loaded.signatures[key].structured_outputs)
        assert {"gradcam", "guided_gradcam"} <= saved
        assert set(report.signatures[key]) == saved


@pytest.mark.parametrize("extra", [{"portable": True}, {"tflite": "m.tflite"}, {"onnx": "m.onnx"}])
def test_cam_and_portable_exports_are_refused_before_anything_is_written(tmp_path, extra):
    """Grad-CAM's ResizeBilinear has no portable form: a one-line OptionError naming both options."""
    from gbp_rewrite.errors import OptionError

    extra = {k: (str(tmp_path / v) if isinstance(v, str) else v) for k, v in extra.items()}
    with pytest.raises(OptionError, match=r"--cam and --portable/--tflite/--onnx exclude each other") as info:
        gbp_rewrite.convert(REPO / "testdata" / "shapes_cnn", tmp_path / "out", cam_layer="pool2", **extra)
    assert "\n" not in str(info.value)
    assert sorted(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# A binary sigmoid head: one unit p = sigmoid(z). As for the saliency (signatures.py), class 1 is
# explained where p > 0.5, else class 0; class 1's score is the logit z, class 0's is -z. So class
# 0's Grad-CAM weights are class 1's negated: its map is ReLU(-sum_k w_k A_k), the regions that
# push the score towards class 0, not a copy of class 1's map.


def binary_cam_spec():
    """SPEC's body (the head ReLU 'fc' included) with one sigmoid unit; its bias puts the median
    logit of the reference inputs at 0, so the batch holds both classes."""
    logits = ref._random_dense(np.random.default_rng(3), "logits", 6, 1, gain=2.0)
    z = ref.forward(SPEC[:-2] + [logits], reference_inputs(SPEC))[:, 0]
    return SPEC[:-2] + [dict(logits, bias=logits["bias"] - np.median(z), activation="sigmoid")]


BINARY_SPEC = binary_cam_spec()


@pytest.fixture(scope="module")
def binary_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("cam_binary_sources")
    built = {}

    def source(case: str):
        if case not in built:
            if case == "keras_path":
                built[case] = ref.keras_model(BINARY_SPEC, INPUT_SHAPE)
            else:
                built[case] = model_zoo.FAMILIES[case](BINARY_SPEC, INPUT_SHAPE, root / case)
        return built[case]

    return source


def test_binary_reference_class_zero_is_the_negated_logit():
    """The reference's binary Grad-CAM (numpy_reference.grad_cam) is that of the network whose
    last layer computes z (class 1) or -z (class 0) with no sigmoid: one linear unit, no classes
    to choose. Class 0 is not class 1's map flipped, and the guided head would change both."""
    x = reference_inputs(BINARY_SPEC)
    last = BINARY_SPEC[-1]
    plain = BINARY_SPEC[:-1] + [dict(last, activation=None)]
    negated = BINARY_SPEC[:-1] + [dict(last, kernel=-last["kernel"], bias=-last["bias"], activation=None)]
    _, _, classes = ref.grad_cam(BINARY_SPEC, x, layer="conv2")
    np.testing.assert_array_equal(classes, ref.forward(BINARY_SPEC, x)[:, 0] > 0.5)
    assert 0 < classes.sum() < len(x), "the batch should hold both classes"
    maps = {}
    for cls, linear in ((1, plain), (0, negated)):
        heat, guided, _ = ref.grad_cam(BINARY_SPEC, x, layer="conv2", class_index=cls)
        linear_heat, linear_guided, _ = ref.grad_cam(linear, x, layer="conv2")
        np.testing.assert_allclose(heat, linear_heat, rtol=1e-12, atol=0)
        np.testing.assert_allclose(guided, linear_guided, rtol=1e-12, atol=0)
        assert heat.max(axis=(1, 2)).min() > 0, "every example's map should be non-zero"
        guided_head, _, _ = ref.grad_cam(BINARY_SPEC, x, layer="conv2", class_index=cls, head_rule="guided")
        assert np.max(np.abs(heat - guided_head)) > 0.05
        maps[cls] = heat
    assert np.max(np.abs(maps[0] - maps[1])) > 0.5


def _check_binary_cam(export_dir: Path, x: np.ndarray) -> None:
    """The export's maps for the predicted class and for classes 0 and 1 equal the reference's."""
    outputs = _run(export_dir, x)
    heat, guided, classes = ref.grad_cam(BINARY_SPEC, x, layer="conv2")
    np.testing.assert_array_equal(outputs["explained_class"], classes)
    assert outputs["gradcam"].dtype == np.float32 and outputs["gradcam"].shape == x.shape[:3]
    assert_close_relative(outputs["gradcam"], heat)
    assert_close_relative(outputs["guided_gradcam"], guided)
    for cls in (0, 1):
        forced = _run(export_dir, x, class_index=np.full(len(x), cls))
        heat, guided, _ = ref.grad_cam(BINARY_SPEC, x, layer="conv2", class_index=cls)
        np.testing.assert_array_equal(forced["explained_class"], np.full(len(x), cls))
        assert_close_relative(forced["gradcam"], heat)
        assert_close_relative(forced["guided_gradcam"], guided)
        assert_close_relative(forced["saliency"], ref.saliency(BINARY_SPEC, x, class_index=cls)[0])


@pytest.mark.parametrize("case", ["keras_path", "keras3", "tf1"])
def test_binary_sigmoid_gradcam_equals_reference_for_both_classes(binary_sources, tmp_path, case):
    x = reference_inputs(BINARY_SPEC)
    report = gbp_rewrite.convert(binary_sources(case), tmp_path / "export", cam=True)
    assert report.score_plan == "binary sigmoid logit"
    assert report.checks["grad-cam layer"] == "layer 'conv2', output [?, 4, 4, 6]"
    _check_binary_cam(tmp_path / "export", x)
    with pytest.raises(tf.errors.InvalidArgumentError, match="class_index must be < 2"):
        _run(tmp_path / "export", x, class_index=np.full(len(x), 2))


def test_binary_sigmoid_gradcam_through_the_cli(binary_sources, tmp_path):
    """convert --cam from the command line, on a .keras file (the Keras path)."""
    import json
    import subprocess

    from conftest import cli_command

    source = model_zoo.spec_keras_file(BINARY_SPEC, INPUT_SHAPE, tmp_path / "binary")
    result = subprocess.run(cli_command("convert", source, tmp_path / "export", "--cam", "--json"),
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["score_plan"] == "binary sigmoid logit"
    assert report["checks"]["grad-cam layer"] == "layer 'conv2', output [?, 4, 4, 6]"
    _check_binary_cam(tmp_path / "export", reference_inputs(BINARY_SPEC))


# ---------------------------------------------------------------------------------------------
# The image-bytes signatures (--image_bytes_signature): serving_bytes and explain_class_bytes call
# the float signatures on the decoded image, so they return the same maps.


def _bytes_batch(spec, *, count: int = 6, seed: int = 21) -> tuple[list[bytes], np.ndarray]:
    """PNGs of random 8x8 RGB images at the model's input size, and the float input the
    'symmetric' preprocessing makes of them (pixels / 127.5 - 1 in float32: inputs of both signs,
    as the reference inputs), kept away from the ReLU and max-pool kinks."""
    pixels = np.random.default_rng(seed).integers(0, 256, (count * 4, *INPUT_SHAPE), dtype=np.uint8)
    x = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    keep = ref.kink_margin(spec, x) > 1e-3
    assert keep.sum() >= count
    return [tf.io.encode_png(p).numpy() for p in pixels[keep][:count]], x[keep][:count]


@pytest.mark.parametrize("case", ["keras3", "keras_path"])
def test_bytes_signatures_return_the_float_signatures_maps(exports, case):
    export_dir, report = exports(case, cam=True, image_bytes=True, preprocess="symmetric")
    encoded, x = _bytes_batch(SPEC)
    loaded = tf.saved_model.load(str(export_dir))
    (key,) = loaded.signatures["serving_default"].structured_input_signature[1]
    top = ref.forward(SPEC, x).argmax(-1)
    other = (top + 2) % 5
    calls = {
        "serving_bytes": ({}, loaded.signatures["serving_default"], top),
        "explain_class_bytes": ({"class_index": tf.constant(other, tf.int64)}, loaded.signatures["explain_class"],
                                other),
    }
    for name, (extra, float_signature, classes) in calls.items():
        signature = loaded.signatures[name]
        assert set(report.signatures[name]) == set(signature.structured_outputs)
        assert {"gradcam", "guided_gradcam", "saliency", "image_size"} <= set(signature.structured_outputs)
        from_bytes = {k: v.numpy() for k, v in signature(image_bytes=tf.constant(encoded), **extra).items()}
        from_floats = {k: v.numpy() for k, v in float_signature(**{key: tf.constant(x)}, **extra).items()}
        np.testing.assert_array_equal(from_bytes["image_size"], np.tile([8, 8], (len(x), 1)))
        np.testing.assert_array_equal(from_bytes["explained_class"], classes)
        assert from_bytes["gradcam"].dtype == np.float32 and from_bytes["gradcam"].shape == x.shape[:3]
        assert from_bytes["guided_gradcam"].dtype == x.dtype and from_bytes["guided_gradcam"].shape == x.shape
        for output in ("gradcam", "guided_gradcam", "saliency"):
            np.testing.assert_allclose(from_bytes[output], from_floats[output], rtol=0, atol=1e-6)
        heat, guided, _ = ref.grad_cam(SPEC, x, layer="conv2", class_index=classes)
        assert_close_relative(from_bytes["gradcam"], heat)
        assert_close_relative(from_bytes["guided_gradcam"], guided)


# ---------------------------------------------------------------------------------------------
# One forward pass: the exported signature holds the model's forward ops once (the graph path
# imports the restored body into the signature's graph instead of calling it; the Keras path calls
# the clone once), so Grad-CAM adds backward work only.


def _ops_reached(export_dir: Path, signature: str) -> dict[str, int]:
    """Op type -> count over the functions `signature` reaches in saved_model.pb (each once)."""
    from collections import Counter

    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    (meta_graph,) = saved.meta_graphs
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    nodes = {n.name: n for n in meta_graph.graph_def.node}
    counts, functions = Counter(), set()

    def called(node):
        return [a.func.name for a in node.attr.values() if a.HasField("func") and a.func.name in library]

    pending = [t.name.split(":")[0] for t in meta_graph.signature_def[signature].outputs.values()]
    seen = set()
    while pending:
        node = nodes[pending.pop()]
        if node.name not in seen:
            seen.add(node.name)
            functions.update(called(node))
            pending.extend(i.lstrip("^").split(":")[0] for i in node.input)
    stack = list(functions)
    while stack:
        for node in library[stack.pop()].node_def:
            counts[node.op] += 1
            new = set(called(node)) - functions
            functions.update(new)
            stack.extend(new)
    return dict(counts)


@pytest.mark.parametrize("case", ["keras3", "tf1", "keras_path"])
def test_the_cam_signature_holds_the_forward_pass_once(exports, case):
    export_dir, _ = exports(case, cam=True)
    for signature in ("serving_default", "explain_class"):
        ops = _ops_reached(export_dir, signature)
        # SPEC's forward: conv1, conv2 (Conv2D), pool1 (MaxPool), fc, logits (MatMul); the backward
        # passes use Conv2DBackpropInput/MaxPoolGrad, and MatMul twice per dense layer each
        assert ops["Conv2D"] == 2 and ops["MaxPool"] == 1, ops
        assert ops["MatMul"] == 2 + 2 * 2 + 2 * 2, ops  # forward, saliency's backward, the head's again


def test_binary_sigmoid_gradcam_with_the_probability_score(binary_sources, tmp_path):
    """--score probability: class 1's score p, class 0's 1 - p. Their gradients are z's and -z's
    times p (1 - p) > 0 per example, so the normalised Grad-CAM maps are the logit's."""
    x = reference_inputs(BINARY_SPEC)
    report = gbp_rewrite.convert(binary_sources("keras3"), tmp_path / "export", cam=True, score="probability")
    assert report.score_plan == "binary sigmoid probability"
    for cls in (0, 1):
        outputs = _run(tmp_path / "export", x, class_index=np.full(len(x), cls))
        heat, guided, _ = ref.grad_cam(BINARY_SPEC, x, layer="conv2", score="probability", class_index=cls)
        assert_close_relative(outputs["gradcam"], heat)
        assert_close_relative(outputs["guided_gradcam"], guided)
        logit_heat, _, _ = ref.grad_cam(BINARY_SPEC, x, layer="conv2", class_index=cls)
        np.testing.assert_allclose(heat, logit_heat, rtol=1e-9, atol=1e-12)
