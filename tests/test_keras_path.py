"""The Keras path (gbp_rewrite.keras.front_end): Keras models in memory and from .keras / .h5 files.

Every model both paths accept is converted both ways (the graph path from `model.export`), and
the two exports must agree to 1e-5 relative: signature layout, predictions, saliency, explained
class and the sites of the report; where the model is a numpy_reference spec, both must equal the
independent numpy backprop too, and so must the in-memory `guided_model`'s own input gradient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
import model_zoo
import numpy_reference as ref
from conftest import INPUT_SHAPE, assert_close_relative, cli_command, conversion_key, reference_inputs, run_cli_concurrently
from gbp_rewrite.errors import SelectionError, SourceModelError

# ---------------------------------------------------------------------------------------------
# Models, built once per session


def _sequential_from_spec(keras, spec):
    """The spec as a keras.Sequential: the functional reference model's layers, in order."""
    functional = ref.keras_model(spec, INPUT_SHAPE, name="ref_functional")
    return keras.Sequential([keras.Input(INPUT_SHAPE), *functional.layers[1:]], name="ref_sequential")


def _lambda_model(keras, function):
    inputs = keras.Input((6,), name="x")
    x = keras.layers.Dense(5, activation="relu", name="fc")(inputs)
    x = keras.layers.Lambda(function, name="lam")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="with_lambda")


# name -> (builder, name of the same model in the session zoo, or None: export it here)
_BUILDERS = {
    **{f"ref@{kind}": (lambda keras, k=kind: ref.keras_model(ref.random_spec(k, seed=1, input_shape=INPUT_SHAPE), INPUT_SHAPE), f"keras3@{kind}")
       for kind in ref.SPEC_KINDS},
    "sequential@cnn": (lambda keras: _sequential_from_spec(keras, ref.random_spec("cnn", seed=1, input_shape=INPUT_SHAPE)), None),
    "sink": (lambda keras: model_zoo.kitchen_sink_keras3(keras), "sink"),
    "multi_io": (lambda keras: model_zoo.multi_io_keras3(keras), "multi_io"),
    # mixed_float16 end to end: float16 compute and a float16 softmax output.
    "mixed_float16": (lambda keras: model_zoo.mixed_float16_keras3(keras, seed=1, batchnorm=True, float16_output=True),
                      None),
}


class KerasModels:
    """In-memory models and their conversions by both paths, each made once per session."""

    def __init__(self, zoo):
        self.zoo = zoo
        self.root = zoo.root / "keras_path"
        self._models: dict[str, object] = {}
        self._converted: dict[tuple, tuple[Path, object]] = {}

    def model(self, name: str):
        if name not in self._models:
            import keras

            self._models[name] = _BUILDERS[name][0](keras)
        return self._models[name]

    def keras_converted(self, name: str, **options):
        return self._cached(("keras", name, options), lambda dst: gbp_rewrite.convert(self.model(name), dst, **options))

    def graph_converted(self, name: str, **options):
        zoo_name = _BUILDERS[name][1]
        if zoo_name is not None:  # the zoo's export of an identical model (checked by predictions)
            return self.zoo.converted(zoo_name, **options)
        return self._cached(("graph", name, options), lambda dst: gbp_rewrite.convert(self.exported(name), dst, **options))

    def exported(self, name: str) -> Path:
        zoo_name = _BUILDERS[name][1]
        if zoo_name is not None:
            return self.zoo.model(zoo_name)
        path = self.root / "exports" / name
        if not path.exists():
            self.model(name).export(str(path), verbose=False)
        return path

    def _cached(self, key, convert):
        key = conversion_key(key[0], key[1], **key[2])  # the zoo's scheme: defaults left out
        if key not in self._converted:
            destination = self.root / f"{key[0]}-{key[1]}-{len(self._converted)}"
            self._converted[key] = (destination, convert(destination))
        return self._converted[key]


@pytest.fixture(scope="session")
def keras_models(zoo) -> KerasModels:
    return KerasModels(zoo)


def _run(zoo, export_dir, inputs, signature="serving_default", **extra):
    function = zoo.loaded(export_dir).signatures[signature]
    keys = sorted(function.structured_input_signature[1])
    feed = dict(inputs)
    if len(feed) == 1 and len([k for k in keys if k != "class_index"]) == 1:  # single-input models:
        (value,) = feed.values()  # the input's key is the KerasTensor's name, which differs per build
        feed = {next(k for k in keys if k != "class_index"): value}
    feed.update(extra)
    return {k: v.numpy() for k, v in function(**{k: tf.constant(v) for k, v in feed.items()}).items()}


def _inputs(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    if name.startswith(("ref@", "sequential@")):
        return {"x": reference_inputs(_spec(name))}
    if name == "sink":
        return {"image": rng.uniform(0, 1, (4, 12, 12, 3)).astype(np.float32)}
    if name == "multi_io":
        return {"image": rng.uniform(0, 1, (3, 8, 8, 3)).astype(np.float32),
                "meta": rng.normal(0, 1, (3, 4)).astype(np.float32),
                "flag": np.array([[0], [1], [2]], np.int32)}
    return {"image": rng.uniform(0, 1, (3, 8, 8, 3)).astype(np.float32)}


def _spec(name: str):
    return ref.random_spec(name.split("@")[1], seed=1, input_shape=INPUT_SHAPE)


def _site_rows(report):
    return [(s.path, s.op_type, s.op_name, s.status) for s in report.sites]


# ---------------------------------------------------------------------------------------------
# The Keras path agrees with the graph path (and with the numpy reference)


CASES = [
    *[("ref@cnn", {"rule": rule}) for rule in ref.RULES],
    ("ref@mlp", {"rule": "guided"}),
    ("ref@residual_bn", {"rule": "deconvnet"}),
    ("ref@residual_bn", {"layers": ["res_conv1"]}),
    ("sequential@cnn", {}),
    ("sink", {}),
    ("sink", {"layers": ["shared"]}),
    ("sink", {"layers": ["block"]}),
    ("sink", {"layers": ["res*", "fc_*"]}),
    ("sink", {"exclude_layers": ["shared", "act6"]}),
    ("multi_io", {"output": "cls", "rule": "vanilla", "score": "probability"}),
    ("multi_io", {"output": "box"}),
]


def _case_id(case):
    name, options = case
    return name + "".join(f"-{k}={','.join(v) if isinstance(v, list) else v}" for k, v in options.items())


@pytest.mark.parametrize("name,options", CASES, ids=[_case_id(c) for c in CASES])
def test_keras_path_agrees_with_graph_path(keras_models, zoo, name, options):
    keras_dir, keras_report = keras_models.keras_converted(name, **options)
    graph_dir, graph_report = keras_models.graph_converted(name, **options)
    inputs = _inputs(name)
    if set(inputs) == {"x"}:
        source = keras_models.exported(name)
        expected = zoo.loaded(source).signatures["serving_default"]
        (key,) = expected.structured_input_signature[1]
        model_out = keras_models.model(name)(inputs["x"], training=False).numpy()
        (exported_out,) = expected(**{key: tf.constant(inputs["x"])}).values()
        np.testing.assert_allclose(model_out, exported_out.numpy(), rtol=1e-6)  # same weights

    # Same layout, same report sites (layer paths, op types, op names, what was done).
    for signature in ("serving_default", "explain_class"):
        keras_fn, graph_fn = zoo.loaded(keras_dir).signatures[signature], zoo.loaded(graph_dir).signatures[signature]
        assert sorted(keras_fn.structured_outputs) == sorted(graph_fn.structured_outputs)
        if set(inputs) != {"x"} or _BUILDERS[name][1] is None:  # else: auto-named inputs of two builds
            assert sorted(keras_fn.structured_input_signature[1]) == sorted(graph_fn.structured_input_signature[1])
    assert _site_rows(keras_report) == _site_rows(graph_report)
    assert keras_report.rewritten and list(keras_report.saliency_outputs) == list(graph_report.saliency_outputs)
    assert ("passes the gradient through" in keras_report.score_note) == (
        "passes the gradient through" in graph_report.score_note)

    # Same numbers: predictions, saliency, explained class; and for other classes.
    from_keras, from_graph = _run(zoo, keras_dir, inputs), _run(zoo, graph_dir, inputs)
    assert set(from_keras) == set(from_graph)
    for key in from_graph:
        if key == "explained_class":
            np.testing.assert_array_equal(from_keras[key], from_graph[key])
        else:
            assert_close_relative(from_keras[key], from_graph[key])
    classes = np.arange(len(from_graph["explained_class"])) % 2
    by_class = _run(zoo, keras_dir, inputs, "explain_class", class_index=classes.astype(np.int64))
    graph_by_class = _run(zoo, graph_dir, inputs, "explain_class", class_index=classes.astype(np.int64))
    for key in keras_report.saliency_outputs:
        assert_close_relative(by_class[key], graph_by_class[key])

    if name.startswith(("ref@", "sequential@")) and "layers" not in options:
        rule = options.get("rule", "guided")
        expected, _ = ref.saliency(_spec(name), inputs["x"].astype(np.float64), rule=rule, score="logit")
        assert_close_relative(from_keras["saliency"], expected)
        assert_close_relative(_in_memory_saliency(keras_models.model(name), inputs["x"], rule), expected)


def _in_memory_saliency(model, x, rule):
    """The input gradient of `guided_model`'s top class, in eager mode; predictions bit-identical."""
    guided = gbp_rewrite.guided_model(model, rule=rule)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = guided(x, training=False)
        score = tf.reduce_sum(outputs * tf.one_hot(tf.argmax(outputs, -1), outputs.shape[-1]))
    np.testing.assert_array_equal(outputs.numpy(), model(x, training=False).numpy())
    return tape.gradient(score, x).numpy()


def test_mixed_float16_converts_on_both_paths(keras_models, zoo):
    inputs = _inputs("mixed_float16")
    keras_dir, keras_report = keras_models.keras_converted("mixed_float16")
    graph_dir, graph_report = keras_models.graph_converted("mixed_float16")
    assert len(keras_report.rewritten) == len(graph_report.rewritten) == 2
    from_keras, from_graph = _run(zoo, keras_dir, inputs), _run(zoo, graph_dir, inputs)
    assert from_keras["output_0"].dtype == np.float16 and from_keras["saliency"].dtype == np.float32
    for outputs in (from_keras, from_graph):
        assert np.all(np.isfinite(outputs["saliency"])) and np.any(outputs["saliency"] != 0)
    assert_close_relative(from_keras["saliency"], from_graph["saliency"], rtol=1e-3)
    guided = gbp_rewrite.guided_model(keras_models.model("mixed_float16"))
    x = tf.constant(inputs["image"])
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = tf.reduce_max(guided(x), axis=-1)
    in_memory = tape.gradient(score, x).numpy()
    assert np.all(np.isfinite(in_memory))
    # The clone's softmax passes the gradient through, like the export's: the same saliency.
    assert_close_relative(in_memory, from_keras["saliency"], rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# The user's model is left as it was


def _snapshot(model, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = tf.reduce_max(model(x, training=False), axis=-1)
    layers = _all_layers(model)
    return {
        "weights": [w.copy() for w in model.get_weights()],
        "activations": [(layer.name, vars(layer).get("activation")) for layer in layers],
        "classes": [type(layer) for layer in layers],
        "inbound_nodes": [len(layer._inbound_nodes) for layer in layers],
        "gradient": tape.gradient(score, x).numpy(),
    }


def _all_layers(model):
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(_all_layers(layer))
    return found


def test_the_users_model_is_unchanged(keras_models):
    import keras

    model = model_zoo.kitchen_sink_keras3(keras)
    x = _inputs("sink")["image"]
    before = _snapshot(model, x)
    guided = gbp_rewrite.guided_model(model, layers=["shared", "block"])
    gbp_rewrite.convert(model, keras_models.root / "unchanged", rule="deconvnet")
    after = _snapshot(model, x)
    for a, b in zip(before["weights"], after["weights"]):
        np.testing.assert_array_equal(a, b)
    assert before["activations"] == after["activations"] and before["classes"] == after["classes"]
    assert before["inbound_nodes"] == after["inbound_nodes"]
    np.testing.assert_array_equal(before["gradient"], after["gradient"])
    # ... while the clone has copies of the weights and its own, guided, gradient.
    assert not set(map(id, guided.weights)) & set(map(id, model.weights))
    for a, b in zip(model.get_weights(), guided.get_weights()):
        np.testing.assert_array_equal(a, b)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        score = tf.reduce_max(guided(xt, training=False), axis=-1)
    assert not np.allclose(tape.gradient(score, xt).numpy(), after["gradient"], rtol=1e-3, atol=1e-7)


def test_clone_keeps_preprocessing_state_of_a_trained_compiled_model():
    """Normalization derives its mean from its variables; Dropout and a compiled optimizer are
    along for the ride: the clone must still predict exactly what the model predicts."""
    import keras

    rng = np.random.default_rng(2)
    keras.utils.set_random_seed(2)
    normalization = keras.layers.Normalization(name="norm")
    normalization.adapt(rng.normal(3.0, 2.0, (64, 6)).astype(np.float32))
    inputs = keras.Input((6,), name="x")
    x = keras.layers.Dense(8, activation="relu", name="fc")(normalization(inputs))
    x = keras.layers.Dropout(0.5, name="drop")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="probs")(x))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(rng.normal(3.0, 2.0, (16, 6)).astype(np.float32), rng.integers(0, 3, 16), epochs=1, verbose=0)
    x = rng.normal(3.0, 2.0, (5, 6)).astype(np.float32)
    guided = gbp_rewrite.guided_model(model)
    np.testing.assert_array_equal(guided(x, training=False).numpy(), model(x, training=False).numpy())


# ---------------------------------------------------------------------------------------------
# Files: .keras, .h5 (Keras 3 and tf-keras), Lambda layers and safe mode


@pytest.fixture(scope="session")
def keras_files(keras_models):
    """sink.h5 (Keras 3), lambda.keras (a Lambda layer), tf_keras.h5 (written by tf-keras)."""
    import keras
    import tf_keras

    root = keras_models.root / "files"
    root.mkdir(parents=True, exist_ok=True)
    files = {"sink.h5": root / "sink.h5", "lambda.keras": root / "lambda.keras", "tf_keras.h5": root / "tf_keras.h5"}
    keras_models.model("sink").save(str(files["sink.h5"]))
    _lambda_model(keras, lambda t: t * 2.0 - 1.0).save(str(files["lambda.keras"]))
    spec = ref.random_spec("cnn", seed=1, input_shape=INPUT_SHAPE)
    inputs = tf_keras.Input(shape=INPUT_SHAPE, name="image")
    tf_keras.Model(inputs, ref._keras_layers(tf_keras, spec, inputs)).save(str(files["tf_keras.h5"]))
    return files


def test_lambda_file_is_refused_by_default_and_converts_with_the_flag(keras_files, keras_models):
    destination = keras_models.root / "lambda-api"
    for call in (gbp_rewrite.inspect, lambda path: gbp_rewrite.convert(path, destination)):
        with pytest.raises(SourceModelError) as error:
            call(keras_files["lambda.keras"])
        assert "Lambda" in str(error.value) and "--unsafe_deserialization" in str(error.value)
        assert "safe_mode=False" in str(error.value)
    assert not destination.exists()
    report = gbp_rewrite.convert(keras_files["lambda.keras"], destination, safe_mode=False)
    assert report.source_format == "keras" and [s.layer for s in report.rewritten] == ["fc"]


def test_tf_keras_h5_equals_numpy_reference(keras_files, keras_models, zoo):
    destination = keras_models.root / "tf_keras-h5"
    report = gbp_rewrite.convert(keras_files["tf_keras.h5"], destination)
    assert report.source_format == "keras-h5"
    assert [(s.layer, s.op_type) for s in report.rewritten] == [("relu1", "Relu"), ("relu6_2", "Relu6")]
    spec = ref.random_spec("cnn", seed=1, input_shape=INPUT_SHAPE)
    x = reference_inputs(spec)
    expected, classes = ref.saliency(spec, x.astype(np.float64), rule="guided")
    outputs = _run(zoo, destination, {"image": x})
    assert_close_relative(outputs["saliency"], expected)
    np.testing.assert_array_equal(outputs["explained_class"], classes)


def test_inspect_reads_keras_files_like_the_export(keras_files, zoo):
    from_h5 = gbp_rewrite.inspect(keras_files["sink.h5"])
    from_export = gbp_rewrite.inspect(zoo.model("sink"))
    assert [(s.layer_path, s.op_type) for s in from_h5.sites] == [(s.layer_path, s.op_type) for s in from_export.sites]
    h5_signature, export_signature = from_h5.signatures["serving_default"], from_export.signatures["serving_default"]
    assert [d.describe() for d in h5_signature.inputs.values()] == [d.describe() for d in export_signature.inputs.values()]
    assert [d.describe() for d in h5_signature.outputs.values()] == [d.describe() for d in export_signature.outputs.values()]
    assert "Keras model" in from_h5.to_text() and "sink/block/inner_relu6" in from_h5.to_text()


def test_keras_files_through_the_command_line(keras_files, keras_models, zoo):
    h5_out, lambda_out = keras_models.root / "cli-h5", keras_models.root / "cli-lambda"
    results = run_cli_concurrently({
        "h5": cli_command("convert", keras_files["sink.h5"], h5_out, "--layers", "shared", "--json"),
        "lambda": cli_command("convert", keras_files["lambda.keras"], lambda_out, "--unsafe_deserialization"),
    })
    for key, result in results.items():
        assert result.returncode == 0, f"{key}: {result.stderr}"
    assert '"source_format": "keras-h5"' in results["h5"].stdout
    inputs = _inputs("sink")
    graph_dir, _ = keras_models.graph_converted("sink", layers=["shared"])
    assert_close_relative(_run(zoo, h5_out, inputs)["saliency"], _run(zoo, graph_dir, inputs)["saliency"])
    assert "rewritten" in results["lambda"].stdout and (lambda_out / "saved_model.pb").exists()


# ---------------------------------------------------------------------------------------------
# What the Keras path cannot rewrite, and what it refuses


def test_relu_in_a_lambda_is_reported_and_cannot_be_selected(keras_models):
    import keras

    model = _lambda_model(keras, lambda t: tf.nn.relu(t) - 1.0)
    info = gbp_rewrite.inspect(model)
    assert [s.layer for s in info.sites] == ["fc", "lam"]
    assert "Lambda" in info.to_text() and "model.export" in info.to_text()
    report = gbp_rewrite.convert(model, keras_models.root / "lambda-relu")
    assert [(s.layer, s.status.split(":")[0]) for s in report.sites] == [("fc", "rewritten"), ("lam", "kept")]
    assert any("model.export" in w for w in report.warnings)
    with pytest.raises(SelectionError, match="lam.*model.export"):
        gbp_rewrite.guided_model(model, layers=["lam"])


def test_selecting_one_call_of_a_shared_layer_is_refused(keras_models):
    with pytest.raises(SelectionError, match="'sink/shared' is called 2 times.*layer name"):
        gbp_rewrite.guided_model(keras_models.model("sink"), layers=["*/shared_1/Relu"])


def test_unknown_layer_lists_the_layers_with_relus(keras_models):
    with pytest.raises(SelectionError) as error:
        gbp_rewrite.guided_model(keras_models.model("sink"), layers=["conv9"])
    assert "'conv9'" in str(error.value) and "sink/block/inner_relu6" in str(error.value)


def test_subclassed_model_is_refused_with_the_savedmodel_route(keras_models):
    import keras

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="subclassed")
            self.dense = keras.layers.Dense(3, activation="relu")

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.zeros((1, 4), np.float32))
    with pytest.raises(SourceModelError) as error:
        gbp_rewrite.convert(model, keras_models.root / "never")
    assert "subclassed" in str(error.value) and "model.export" in str(error.value)
    assert "gbp-rewrite convert" in str(error.value)
    assert not (keras_models.root / "never").exists()
