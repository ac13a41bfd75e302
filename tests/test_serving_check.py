"""Tests for the C++ serving check (gbp_rewrite/cpp/serving_check.cc): the TF-Serving-path runner.

The binary is built once per session by conftest's serving_check_binary into
the session's cache folder (later builds find it there and cost a stat()).  Each test compares what the binary produces through
LoadSavedModel + Session::Run with what Python's
tf.saved_model.load(...).signatures[key](...) returns on the same inputs.
"""

from __future__ import annotations

import pathlib
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import serving_check_build

ERROR_PREFIX = "serving_check: error: "
RUN_TIMEOUT = 300


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary(serving_check_binary) -> pathlib.Path:
    # Built once per session by the conftest fixture (skipped only without a compiler).
    return serving_check_binary


class _TwoOutputs(tf.Module):
    """float32 [None,4] -> {"scores": float32 [None,3], "label": int64 [None]}."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(
            tf.random.stateless_normal([4, 3], seed=[1, 2]), name="w"
        )
        self.b = tf.Variable([0.1, -0.2, 0.3], name="b")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def __call__(self, x):
        scores = tf.nn.relu(tf.matmul(x, self.w) + self.b) * 1.7
        return {"scores": scores, "label": tf.argmax(scores, axis=-1)}


class _Identity(tf.Module):
    """One input per supported dtype, each returned unchanged (plus 1)."""

    SPECS = {
        "f16": tf.TensorSpec([None, 2], tf.float16, name="f16"),
        "f32": tf.TensorSpec([None, 2], tf.float32, name="f32"),
        "f64": tf.TensorSpec([None, 2], tf.float64, name="f64"),
        "i32": tf.TensorSpec([None, 2], tf.int32, name="i32"),
        "i64": tf.TensorSpec([None, 2], tf.int64, name="i64"),
        "u8": tf.TensorSpec([None, None, 3], tf.uint8, name="u8"),
        "flag": tf.TensorSpec([None], tf.bool, name="flag"),
    }

    @tf.function(input_signature=[SPECS])
    def __call__(self, inputs):
        out = {}
        for k, v in inputs.items():
            out[f"out_{k}"] = tf.logical_not(v) if v.dtype == tf.bool else v + 1
        return out


@pytest.fixture(scope="module")
def module_model(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("models") / "two_outputs"
    m = _TwoOutputs()
    tf.saved_model.save(
        m,
        str(path),
        signatures={"serving_default": m.__call__, "predict": m.__call__},
    )
    return path


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("models") / "identity"
    m = _Identity()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.__call__})
    return path


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("models") / "keras"
    keras.utils.set_random_seed(3)
    inp = keras.Input((4,), name="features")
    h = keras.layers.Dense(8, activation="relu")(inp)
    out = keras.layers.Dense(2, activation="softmax")(h)
    keras.Model(inp, out).export(str(path))
    return path


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def run(binary, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def error_lines(proc) -> list[str]:
    return [l for l in proc.stderr.splitlines() if l.startswith(ERROR_PREFIX)]


def check_ok(proc):
    assert proc.returncode == 0, (
        f"serving_check exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
        f"stderr:\n{proc.stderr}"
    )
    assert not error_lines(proc)


def python_outputs(model_dir, key, inputs: dict[str, np.ndarray]):
    fn = tf.saved_model.load(str(model_dir)).signatures[key]
    result = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in result.items()}


def summary(proc) -> dict[str, tuple[str, str]]:
    out = {}
    for line in proc.stdout.splitlines():
        key, dtype, shape = line.split(" ")
        out[key] = (dtype, shape)
    return out


def assert_matches_python(out_dir, proc, model_dir, key, inputs):
    expected = python_outputs(model_dir, key, inputs)
    printed = summary(proc)
    assert sorted(printed) == sorted(expected)
    for name, want in expected.items():
        got = np.load(out_dir / f"{name}.npy")
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert printed[name] == (
            str(want.dtype),
            "[" + ",".join(str(d) for d in want.shape) + "]",
        )
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def test_build_is_incremental(binary):
    assert serving_check_build().built_binary() == binary
    mtime = binary.stat().st_mtime_ns
    assert serving_check_build().build() == binary
    assert binary.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("key", ["serving_default", "predict"])
def test_module_npy_inputs(binary, module_model, tmp_path, key):
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    proc = run(
        binary, "--model", module_model, "--signature", key,
        "--input", f"x={tmp_path / 'x.npy'}", "--output_dir", out,
    )
    check_ok(proc)
    assert not (out / "input_x.npy").exists()
    assert_matches_python(out, proc, module_model, key, {"x": x})
    assert summary(proc) == {
        "label": ("int64", "[3]"),
        "scores": ("float32", "[3,3]"),
    }


def test_module_generated_inputs(binary, module_model, tmp_path):
    out = tmp_path / "out"
    proc = run(
        binary, "--model", module_model, "--signature", "serving_default",
        "--batch", 5, "--seed", 7, "--output_dir", out,
    )
    check_ok(proc)
    x = np.load(out / "input_x.npy")
    assert x.dtype == np.float32 and x.shape == (5, 4)
    assert np.all(x >= 0) and np.all(x < 1) and np.unique(x).size > 1
    assert_matches_python(out, proc, module_model, "serving_default", {"x": x})

    # Same seed -> same data; another seed -> different data.
    same = run(binary, "--model", module_model, "--signature", "serving_default",
               "--batch", 5, "--seed", 7, "--output_dir", tmp_path / "same")
    other = run(binary, "--model", module_model, "--signature", "serving_default",
                "--batch", 5, "--seed", 8, "--output_dir", tmp_path / "other")
    check_ok(same)
    check_ok(other)
    np.testing.assert_array_equal(np.load(tmp_path / "same" / "input_x.npy"), x)
    assert not np.array_equal(np.load(tmp_path / "other" / "input_x.npy"), x)


def test_keras_model(binary, keras_model, tmp_path):
    feats = np.random.default_rng(1).uniform(-2, 2, size=(6, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    out = tmp_path / "npy"
    proc = run(binary, "--model", keras_model, "--signature", "serving_default",
               "--input", f"features={tmp_path / 'f.npy'}", "--output_dir", out)
    check_ok(proc)
    assert_matches_python(out, proc, keras_model, "serving_default",
                          {"features": feats})

    gen = tmp_path / "gen"
    proc = run(binary, "--model", keras_model, "--signature", "serving_default",
               "--output_dir", gen)
    check_ok(proc)
    feats = np.load(gen / "input_features.npy")
    assert feats.shape == (2, 4) and feats.dtype == np.float32  # default --batch 2
    assert_matches_python(gen, proc, keras_model, "serving_default",
                          {"features": feats})


def test_dtypes_roundtrip(binary, identity_model, tmp_path):
    rng = np.random.default_rng(2)
    inputs = {
        "f16": rng.normal(size=(3, 2)).astype(np.float16),
        "f32": rng.normal(size=(3, 2)).astype(np.float32),
        "f64": rng.normal(size=(3, 2)),
        "i32": rng.integers(-1000, 1000, size=(3, 2), dtype=np.int32),
        "i64": rng.integers(-(2**40), 2**40, size=(3, 2), dtype=np.int64),
        "u8": rng.integers(0, 255, size=(3, 5, 3), dtype=np.uint8),
        "flag": np.array([True, False, True]),
    }
    args = []
    for i, (name, arr) in enumerate(inputs.items()):
        f = tmp_path / f"{name}.npy"
        # Alternate .npy format versions 1.0 and 2.0.
        with open(f, "wb") as fh:
            np.lib.format.write_array(fh, arr, version=(1, 0) if i % 2 else (2, 0))
        args += ["--input", f"{name}={f}"]
    out = tmp_path / "out"
    proc = run(binary, "--model", identity_model, "--signature", "serving_default",
               *args, "--output_dir", out)
    check_ok(proc)
    assert_matches_python(out, proc, identity_model, "serving_default", inputs)

    # Generated: floats in [0,1), ints zero, bools False, unknown non-batch
    # dims -> 1.
    gen = tmp_path / "gen"
    proc = run(binary, "--model", identity_model, "--signature", "serving_default",
               "--batch", 4, "--output_dir", gen)
    check_ok(proc)
    generated = {k: np.load(gen / f"input_{k}.npy") for k in inputs}
    for name, arr in generated.items():
        assert arr.dtype == inputs[name].dtype, name
    assert generated["u8"].shape == (4, 1, 3)
    assert generated["flag"].shape == (4,) and not generated["flag"].any()
    for name in ("i32", "i64", "u8"):
        assert not generated[name].any(), name
    for name in ("f16", "f32", "f64"):
        arr = generated[name]
        assert arr.shape == (4, 2) and np.all(arr >= 0) and np.all(arr < 1), name
    assert_matches_python(gen, proc, identity_model, "serving_default", generated)


def test_wrong_signature_key(binary, module_model, tmp_path):
    proc = run(binary, "--model", module_model, "--signature", "no_such_key",
               "--output_dir", tmp_path / "out")
    assert proc.returncode == 1
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert "no_such_key" in errors[0]
    assert "serving_default" in errors[0] and "predict" in errors[0]
    assert proc.stdout == ""


def test_missing_model_dir(binary, tmp_path):
    proc = run(binary, "--model", tmp_path / "does_not_exist",
               "--signature", "serving_default", "--output_dir", tmp_path / "out")
    assert proc.returncode == 1
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert "does_not_exist" in errors[0]


def test_bad_inputs_are_errors(binary, module_model, tmp_path):
    np.save(tmp_path / "wrong_dtype.npy", np.zeros((2, 4), np.float64))
    np.save(tmp_path / "wrong_shape.npy", np.zeros((2, 5), np.float32))
    cases = {
        "float64": ["--input", f"x={tmp_path / 'wrong_dtype.npy'}"],
        "incompatible": ["--input", f"x={tmp_path / 'wrong_shape.npy'}"],
        "no such input": ["--input", f"y={tmp_path / 'wrong_shape.npy'}"],
        "cannot open": ["--input", f"x={tmp_path / 'missing.npy'}"],
    }
    for needle, extra in cases.items():
        proc = run(binary, "--model", module_model, "--signature",
                   "serving_default", *extra, "--output_dir", tmp_path / "out")
        assert proc.returncode == 1, needle
        errors = error_lines(proc)
        assert len(errors) == 1 and needle in errors[0], (needle, proc.stderr)
