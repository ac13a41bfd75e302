"""`convert(..., portable=True, tflite=..., onnx=...)`: the written .tflite and .onnx files run in
LiteRT and onnxruntime and give the independent numpy reference's saliency (where it applies) or the
regular TensorFlow export's (built with TensorFlow's own gradients); the bad cases end in one-line
errors with nothing written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tensorflow as tf

import model_zoo
import numpy_reference as ref
from conftest import assert_close_relative, reference_inputs
from gbp_rewrite import cli, convert, tf_internals
from gbp_rewrite.errors import OptionError, OutputError, VerificationError
from gbp_rewrite.portable import export as portable_export
from gbp_rewrite.portable import gradients as portable_gradients

pytest.importorskip("ai_edge_litert.interpreter", reason="needs the tflite extra")
pytest.importorskip("onnxruntime", reason="needs the onnx extra")

RTOL = 1e-5
SIZE_LIMIT = 1.2  # each file at most this times the float weights


def _portable(source: Path, root: Path, name: str, **options):
    """Convert `source` with both files; (export dir, .tflite, .onnx, report)."""
    out, tflite, onnx = root / name, root / f"{name}.tflite", root / f"{name}.onnx"
    report = convert(source, out, tflite=tflite, onnx=onnx, **options)
    return out, tflite, onnx, report


def _run_all(export_dir: Path, tflite: Path, onnx: Path, x: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """The outputs of the portable SavedModel (in TensorFlow), the .tflite and the .onnx on `x`."""
    serving = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    (key,) = serving.structured_input_signature[1]
    return {
        "tensorflow": {k: v.numpy() for k, v in serving(**{key: tf.constant(x)}).items()},
        "litert": portable_export.run_tflite(tflite, "serving_default", {key: x}),
        "onnxruntime": portable_export.run_onnx(onnx, {key: x}),
    }


def _weights_bytes(export_dir: Path) -> int:
    return sum(f.stat().st_size for f in (export_dir / "variables").iterdir())


def _prediction_key(outputs) -> str:
    (key,) = [k for k in outputs if k not in ("saliency", "explained_class")]
    return key


# ---------------------------------------------------------------------------------------------
# Against the independent numpy reference


REFERENCE_CASES = [("keras3", "cnn", "guided"), ("keras3", "residual_bn", "guided"), ("keras3", "mlp", "deconvnet"),
                   ("tf1", "cnn", "vanilla"), ("tf2_module", "cnn", "guided")]


@pytest.mark.parametrize("family,kind,rule", REFERENCE_CASES, ids=["-".join(c) for c in REFERENCE_CASES])
def test_both_runtimes_equal_the_numpy_reference(zoo, tmp_path, family, kind, rule):
    spec = zoo.spec(kind)
    export_dir, tflite, onnx, report = _portable(zoo.model(f"{family}@{kind}"), tmp_path, "m", rule=rule)
    assert report.rewritten
    x = reference_inputs(spec)
    expected, classes = ref.saliency(spec, x, rule=rule, score="logit")
    for runtime, outputs in _run_all(export_dir, tflite, onnx, x).items():
        assert_close_relative(outputs["saliency"], expected, rtol=RTOL)
        np.testing.assert_array_equal(outputs["explained_class"], classes, err_msg=runtime)
        assert_close_relative(outputs[_prediction_key(outputs)], ref.forward(spec, x), rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# Against the regular export (TensorFlow's own gradients), where the reference has no such layers


class Conversions:
    """Portable (with both files) and regular conversions of named sources, each made once per
    module: the tests evaluate the same files on different inputs."""

    def __init__(self, root: Path, sources: dict[str, Callable[[Path], Path]]):
        self.root, self.sources = root, sources
        self._sources: dict[str, Path] = {}
        self._portable: dict[str, tuple] = {}
        self._regular: dict[str, Path] = {}

    def source(self, name: str) -> Path:
        if name not in self._sources:
            self._sources[name] = self.sources[name](self.root / "sources" / name)
        return self._sources[name]

    def portable(self, name: str):
        """(export dir, .tflite, .onnx, report) of `name` converted with both files."""
        if name not in self._portable:
            (self.root / name).mkdir(parents=True, exist_ok=True)
            self._portable[name] = _portable(self.source(name), self.root / name, "portable")
        return self._portable[name]

    def regular(self, name: str) -> Path:
        """The regular export of `name` (TensorFlow's own gradient kernels): the reference."""
        if name not in self._regular:
            self._regular[name] = self.root / name / "regular"
            convert(self.source(name), self._regular[name])
        return self._regular[name]


def _keras_export(build: Callable) -> Callable[[Path], Path]:
    def export(path: Path) -> Path:
        build().export(str(path), verbose=False)
        return path

    return export


@pytest.fixture(scope="module")
def conversions(tmp_path_factory, zoo):
    import keras

    return Conversions(tmp_path_factory.mktemp("portable_models"), {
        "pools": _keras_export(lambda: model_zoo.portable_pools_keras3(keras)),
        "pools_fixed_batch": _keras_export(lambda: model_zoo.portable_pools_keras3(keras, batch_size=2)),
        "separable": _keras_export(lambda: model_zoo.portable_separable_keras3(keras)),
        "uncovered": _keras_export(lambda: model_zoo.uncovered_op_keras3(keras)),
        "shapes_cnn": lambda _: zoo.model("shapes_cnn"),
    })


def _against_regular_export(conversions: Conversions, name: str, x: np.ndarray):
    """The portable conversion's three runs of `x` against the regular export's; its report."""
    export_dir, tflite, onnx, report = conversions.portable(name)
    regular = tf.saved_model.load(str(conversions.regular(name))).signatures["serving_default"]
    (key,) = regular.structured_input_signature[1]
    expected = {k: v.numpy() for k, v in regular(**{key: tf.constant(x)}).items()}
    assert np.max(np.abs(expected["saliency"])) > 0
    for runtime, outputs in _run_all(export_dir, tflite, onnx, x).items():
        for k, want in expected.items():
            if want.dtype.kind == "f":
                assert_close_relative(outputs[k], want, rtol=RTOL)
            else:
                np.testing.assert_array_equal(outputs[k], want, err_msg=f"{runtime} {k}")
    return report


@pytest.mark.parametrize("name", ["pools", "pools_fixed_batch", "separable"])
def test_coverage_models_through_both_runtimes(conversions, name):
    shape = {"separable": (2, 17, 17, 3)}.get(name, (2, 16, 16, 3))
    x = np.random.default_rng(4).uniform(0, 1, shape).astype(np.float32)
    report = _against_regular_export(conversions, name, x)
    assert "all TFLite builtins and ONNX ops" in report.checks["portable ops"]
    assert "LiteRT runs the file" in report.checks["tflite"]
    assert "onnxruntime runs the file" in report.checks["onnx"]


def test_flat_colour_images_tie_in_every_pool(conversions):
    """Flat colours scaled by 1/255: max-pool windows full of equal values, after ReLUs full of zeros."""
    rng = np.random.default_rng(5)
    x = np.repeat(np.repeat(rng.integers(0, 4, (2, 2, 2, 3)), 8, axis=1), 8, axis=2).astype(np.float32) / 255.0
    _against_regular_export(conversions, "pools", x)


def test_testdata_cnn(conversions):
    images = [tf.io.decode_png(tf.io.read_file(str(p))).numpy()
              for p in sorted((Path(__file__).parents[1] / "testdata" / "images").glob("*.png"))]
    x = np.stack(images).astype(np.float32) / 255.0
    _against_regular_export(conversions, "shapes_cnn", x)


def test_small_mobilenetv2(tmp_path):
    """The one keras.applications model (alpha 0.35, 32x32: strided and residual depthwise blocks,
    ReLU6, global pooling), with the vanilla rule: its saliency is then the true gradient of the top
    logit, which TensorFlow's own GradientTape on the Keras model gives (no gbp_rewrite code)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10,
                                           classifier_activation=None)
    model.export(str(tmp_path / "mobilenetv2"), verbose=False)
    export_dir, tflite, onnx, _ = _portable(tmp_path / "mobilenetv2", tmp_path, "portable", rule="vanilla")
    x = tf.constant(np.random.default_rng(6).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model(x, training=False)
        top = tf.reduce_max(logits, axis=1)  # each example's top logit (examples are independent)
    expected = tape.gradient(top, x).numpy()
    for runtime, outputs in _run_all(export_dir, tflite, onnx, x.numpy()).items():
        assert_close_relative(outputs["saliency"], expected, rtol=RTOL)
        np.testing.assert_array_equal(outputs["explained_class"], np.argmax(logits, axis=1), err_msg=runtime)
        assert_close_relative(outputs[_prediction_key(outputs)], logits.numpy(), rtol=RTOL)
    # Every BatchNorm folded into its convolution, each kernel stored once (a BatchNorm left unfolded
    # made the converters store the kernel scaled for the forward op and plain for the backward).
    weights = _weights_bytes(tmp_path / "mobilenetv2")
    sizes = {path.name: path.stat().st_size for path in (tflite, onnx)}
    assert all(size <= SIZE_LIMIT * weights for size in sizes.values()), f"{sizes} against {weights} bytes of weights"


def test_files_are_at_most_1_2_times_the_weights(conversions):
    """Dense and convolution kernels stored once: the backward ops re-lay them out at run time
    (LiteRT) or through Transpose nodes onnxruntime folds at load (ONNX). (The tiny zoo models are
    mostly graph, not weights: the testdata CNN is the one with real layer sizes.)"""
    _, tflite, onnx, _ = conversions.portable("shapes_cnn")
    weights = _weights_bytes(conversions.regular("shapes_cnn"))
    sizes = {path.name: path.stat().st_size for path in (tflite, onnx)}
    assert all(size <= SIZE_LIMIT * weights for size in sizes.values()), f"{sizes} against {weights} bytes of weights"


def test_each_kernel_is_stored_once(conversions):
    """No initializer of the .onnx and no constant buffer of the .tflite is another one's transpose
    or equal to it (the checks here are numpy's, on the files' own bytes)."""
    import onnx
    from onnx import numpy_helper
    from tensorflow.lite.python import schema_py_generated as schema

    _, tflite, onnx_path, _ = conversions.portable("shapes_cnn")
    onnx_arrays = [numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer]
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite.read_bytes(), 0))
    tflite_arrays = []
    for tensor in model.subgraphs[0].tensors:
        data = model.buffers[tensor.buffer].data
        if data is not None and len(data) and tensor.type == schema.TensorType.FLOAT32:
            tflite_arrays.append(np.frombuffer(bytes(data), np.float32).reshape(tensor.shape))
    for kind, arrays in (("onnx", onnx_arrays), ("tflite", tflite_arrays)):
        big = [a for a in arrays if a.size >= 1024]
        assert len(big) >= 3, f"{kind}: {[a.shape for a in big]}"  # two convolutions and a dense layer
        sorted_values = [np.sort(a, axis=None) for a in big]
        for i in range(len(big)):
            for j in range(i):
                assert not (big[i].size == big[j].size and np.array_equal(sorted_values[i], sorted_values[j])), \
                    f"{kind}: a kernel of shape {big[i].shape} is stored twice (also as {big[j].shape})"


# ---------------------------------------------------------------------------------------------
# Bad cases: one line, nothing written


def _nothing_written(tmp_path: Path, *names: str) -> None:
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in names)
    assert left == [], f"left behind: {left}"


def test_an_op_without_portable_gradient_names_the_op_and_layer(conversions, tmp_path):
    with pytest.raises(portable_gradients.PortableGradientError) as caught:
        _portable(conversions.source("uncovered"), tmp_path, "m")
    message = str(caught.value)
    assert "\n" not in message
    assert "StridedSliceGrad" in message and "layer 'uncovered/crop'" in message
    _nothing_written(tmp_path)


def test_portable_alone_writes_no_files(zoo, tmp_path):
    report = convert(zoo.model("keras3@cnn"), tmp_path / "m", portable=True)
    assert "portable ops" in report.checks and "tflite" not in report.checks
    _nothing_written(tmp_path, "m")


@pytest.mark.parametrize("kind,module", [("tflite", "ai_edge_litert.interpreter"), ("onnx", "onnxruntime")])
def test_a_missing_extra_is_named(monkeypatch, tmp_path, kind, module):
    real = portable_export.importlib.import_module

    def without(name, *args):
        if name == module:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(portable_export.importlib, "import_module", without)
    with pytest.raises(OptionError, match=rf"--{kind} needs the optional extra '{kind}'.*pip install -e '\.\[{kind}\]'"):
        convert(Path(__file__).parents[1] / "testdata" / "shapes_cnn", tmp_path / "m", **{kind: tmp_path / f"m.{kind}"})
    _nothing_written(tmp_path)


def test_tf2onnx_leaving_an_unsupported_op_is_refused(zoo, tmp_path):
    """A regular export holds ReluGrad and MaxPoolGrad: tf2onnx 'succeeds' and leaves them behind."""
    regular, _ = zoo.converted("shapes_cnn")
    with pytest.raises(VerificationError, match=r"tf2onnx left ops unconverted.*(ReluGrad|MaxPoolGrad)"):
        portable_export.write_onnx(regular, "serving_default", tmp_path / "m.onnx")
    _nothing_written(tmp_path)


def test_the_tflite_converter_refusing_flex_ops(zoo, tmp_path):
    regular, _ = zoo.converted("shapes_cnn")
    with pytest.raises(VerificationError, match="TFLite converter refused"):
        portable_export.write_tflite(regular, "serving_default", tmp_path / "m.tflite")
    _nothing_written(tmp_path)


def test_a_failing_file_check_leaves_nothing(monkeypatch, tmp_path):
    """The last file fails after the .tflite was written and checked and the .onnx written."""

    def broken(export_dir, signature, path):
        path.write_bytes(b"half")
        raise VerificationError("onnx.checker rejects it (simulated)")

    monkeypatch.setattr(portable_export, "write_onnx", broken)
    source = Path(__file__).parents[1] / "testdata" / "shapes_cnn"
    with pytest.raises(VerificationError, match="simulated"):
        _portable(source, tmp_path, "m")
    _nothing_written(tmp_path)


def test_an_existing_file_needs_overwrite(tmp_path):
    (tmp_path / "m.tflite").write_bytes(b"keep")
    with pytest.raises(OutputError, match=r"--tflite .*m\.tflite' exists; pass --overwrite"):
        convert(Path(__file__).parents[1] / "testdata" / "shapes_cnn", tmp_path / "m", tflite=tmp_path / "m.tflite")
    assert (tmp_path / "m.tflite").read_bytes() == b"keep"
    _nothing_written(tmp_path, "m.tflite")


def test_keras_sources_are_told_to_export_first(tmp_path):
    with pytest.raises(OptionError, match=r"model\.export\(DIR\)"):
        convert(Path(__file__).parents[1] / "testdata" / "shapes_cnn.keras", tmp_path / "m", portable=True)


def test_cli_writes_the_tflite_file(tmp_path, capsys):
    """`convert --tflite` through the command line's parser and main (in-process: no second
    TensorFlow start-up), and a missing folder as a one-line error with exit status 1."""
    source = Path(__file__).parents[1] / "testdata" / "shapes_cnn"
    loggers = [logging.getLogger(), logging.getLogger("gbp_rewrite")]

    def run(*argv):
        levels = [logger.level for logger in loggers]
        try:
            return cli.main(cli.parse_command_line(["gbp-rewrite", "convert", *map(str, argv)]))
        finally:  # main() sets the levels for a command-line run
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)

    assert run(source, tmp_path / "m", "--tflite", tmp_path / "m.tflite") == 0
    assert "LiteRT runs the file" in capsys.readouterr().out
    assert (tmp_path / "m.tflite").stat().st_size > 0
    assert run(source, tmp_path / "n", "--onnx", tmp_path / "no" / "m.onnx") == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "does not exist" in error[0]


# ---------------------------------------------------------------------------------------------
# Kink flips (issue 14): ResNet50's one ReLU at its kink passes; a wrong gradient still fails

KINKS = 8  # hidden units at their kink per probe example


def _kink_dense(keras, probe: np.ndarray, *, units: int = 64):
    """Flatten -> Dense(units) -> ReLU -> Dense(4), fixed seed: hidden units [0, KINKS) have their
    pre-activation at 0 to rounding on probe example 0 and [KINKS, 2 KINKS) on example 1 (the bias
    cancels the float64 sum), the rest are far from 0. The piece of ResNet50 that failed the LiteRT
    check: its conv4_block4_out ReLU after the residual Add, 8e-10 in LiteRT, <= 0 in TensorFlow.
    Returns the model and its weights (w1, b1, w2)."""
    rng = np.random.default_rng(11)
    flat = probe.reshape(len(probe), -1).astype(np.float64)
    w1 = rng.normal(0, 1, (flat.shape[1], units)).astype(np.float32)
    b1 = rng.normal(0, 3, units)
    for example in range(2):
        on_kink = slice(example * KINKS, (example + 1) * KINKS)
        b1[on_kink] = -(flat[example] @ w1[:, on_kink].astype(np.float64))
    w2 = rng.normal(0, 1, (units, 4)).astype(np.float32)
    inputs = keras.Input(probe.shape[1:], name="image")
    hidden, head = keras.layers.Dense(units, name="hidden"), keras.layers.Dense(4, name="logits")
    model = keras.Model(inputs, head(keras.layers.ReLU(name="relu")(hidden(keras.layers.Flatten()(inputs)))))
    hidden.set_weights([w1, b1.astype(np.float32)])
    head.set_weights([w2, np.zeros(4, np.float32)])
    return model, (w1, b1, w2)


def _guided_up_to_kink_gates(saliency: np.ndarray, cls: int, example: int, probe: np.ndarray, weights) -> float:
    """How far (relative) one example's saliency is from the float64 guided backprop of the
    _kink_dense model under the best choice of its KINKS on-kink ReLU gates (the others' gates
    from the float64 forward): 0 to rounding when the runtime made some choice at each kink."""
    w1, b1, w2 = (np.asarray(w, np.float64) for w in weights)
    z = probe[example].reshape(-1).astype(np.float64) @ w1 + b1
    upstream = np.maximum(w2[:, cls], 0)  # the guided rule: positive upstream gradient only
    on_kink = np.zeros(len(b1), bool)
    on_kink[example * KINKS:(example + 1) * KINKS] = True
    known = w1 @ (upstream * ((z > 0) & ~on_kink))
    columns = w1[:, on_kink] * upstream[on_kink]
    target = saliency.reshape(-1).astype(np.float64) - known
    gates = np.linalg.lstsq(columns, target, rcond=None)[0].round().clip(0, 1)
    best = known + columns @ gates
    return float(np.max(np.abs(saliency.reshape(-1) - best)) / np.max(np.abs(best)))


def test_relus_at_their_kink_pass_the_file_check(tmp_path):
    """Units at their kink flip between TensorFlow and the runtimes (float noise in the last bits
    of the forward): the check accepts it, and each runtime's saliency is still exactly guided
    backpropagation (the float64 reference written here) for some choice of those gates."""
    import keras

    probe = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)  # convert's probe batch
    model, weights = _kink_dense(keras, probe)
    model.export(str(tmp_path / "source"), verbose=False)
    export_dir, tflite, onnx, report = _portable(tmp_path / "source", tmp_path, "m")
    own = portable_export.NudgedReference(export_dir, signature="serving_default", probe={"image": probe})
    tensorflow = _run_all(export_dir, tflite, onnx, probe)["tensorflow"]
    scale = np.max(np.abs(tensorflow["saliency"]))
    assert any(np.max(np.abs(run["saliency"] - tensorflow["saliency"])) > 1e-3 * scale for run in own.runs()), \
        "TensorFlow's own saliency should jump between nudged inputs: the units are not at their kink"
    assert "kink flips" in report.checks["tflite"] + report.checks["onnx"], \
        "neither runtime flipped a gate: the failure mode was not reproduced"
    for runtime, outputs in _run_all(export_dir, tflite, onnx, probe).items():
        for example, cls in enumerate(outputs["explained_class"]):
            off = _guided_up_to_kink_gates(outputs["saliency"][example], int(cls), example, probe, weights)
            assert off <= RTOL, f"{runtime} example {example}: {off:.3g} from guided backprop under any kink gates"


def _scaled_max_pool_gradient(factor: float) -> str:
    """Register (once) a MaxPool gradient `factor` times the portable one; its gradient name."""
    name = f"GbpTest_WrongMaxPool_{factor}"
    if not tf_internals.is_gradient_registered(name):
        right = portable_gradients.GRADIENTS["MaxPool"]
        tf.RegisterGradient(name)(lambda op, dy: right(op, dy) * factor)
    return name


def _writing_from(writer: Callable, export_dir: Path) -> Callable:
    """`writer` (write_tflite/write_onnx) writing from `export_dir` whatever export it is given."""
    return lambda _, signature, path: writer(export_dir, signature, path)


def test_a_wrong_gradient_in_the_file_still_fails(conversions, monkeypatch, tmp_path):
    """The files are written from an export whose MaxPool gradient is 1.001 times the right one
    (an error smaller than ResNet50's kink flip, 3.6e-3): on a model without kinks at the probe,
    TensorFlow's own variation is ~0 and the check refuses it, leaving nothing behind."""
    portable_gradients.register()
    source = conversions.source("pools")
    right_type = portable_gradients.gradient_op_type
    with monkeypatch.context() as patch:
        wrong = _scaled_max_pool_gradient(1.001)
        patch.setattr(portable_gradients, "gradient_op_type", lambda op: wrong if op == "MaxPool" else right_type(op))
        convert(source, tmp_path / "wrong", portable=True)
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    right, _, _, _ = conversions.portable("pools")
    saliency = [tf.saved_model.load(str(d)).signatures["serving_default"](image=tf.constant(x))["saliency"].numpy()
                for d in (right, tmp_path / "wrong")]
    assert 1e-4 < np.max(np.abs(saliency[1] - saliency[0])) / np.max(np.abs(saliency[0])) < 1e-2
    for kind in ("tflite", "onnx"):
        writer = f"write_{kind}"
        with monkeypatch.context() as patch:
            patch.setattr(portable_export, writer, _writing_from(getattr(portable_export, writer), tmp_path / "wrong"))
            out = tmp_path / kind
            out.mkdir()
            with pytest.raises(VerificationError, match="no kink flip") as caught:
                convert(source, out / "m", **{kind: out / f"m.{kind}"})
            assert "\n" not in str(caught.value)
            _nothing_written(out)
