"""Shared fixtures: small models built once per session, conversions and loads cached, CLI runners."""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import model_zoo  # noqa: E402
import numpy_reference as ref  # noqa: E402
from fingerprints import source_fingerprint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (8, 8, 3)
ALLOW_NO_CXX = "GBP_REWRITE_ALLOW_NO_CXX"  # "1": the C++ tests skip on a machine without g++
REFERENCE_INPUT_TRIES = 20

# .ci/run's oldest-TensorFlow venv installs only the `test-core` extra and sets
# GBP_REWRITE_TEST_CORE_ONLY=1: the test files of the optional extras are then not collected.
# Everywhere else they are, so a missing extra fails them (a missing install step fails CI).
OPTIONAL_EXTRA_TESTS = ["test_beam.py", "test_grpc_serving.py", "test_warmup.py"]
collect_ignore = OPTIONAL_EXTRA_TESTS if os.environ.get("GBP_REWRITE_TEST_CORE_ONLY") == "1" else []


class Zoo:
    """Builds each test model on first use and keeps it for the session."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}
        self._converted: dict[tuple, tuple[Path, object]] = {}
        self._loaded: dict[Path, object] = {}

    def model(self, name: str) -> Path:
        if name not in self._built:
            path = self.root / "models" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            self._built[name] = self._build(name, path)
        return self._built[name]

    def _build(self, name: str, path: Path) -> Path:
        import keras

        if "@" in name:  # "<family>@<spec kind>"
            family, kind = name.split("@")
            return model_zoo.FAMILIES[family](self.spec(kind), INPUT_SHAPE, path)
        builders = {
            "string_input": lambda: model_zoo.string_input_module(path),
            "relu6_hand": lambda: model_zoo.relu6_hand_module(path),
            "float16": lambda: model_zoo.float16_module(path),
            "mixed_float16": lambda: model_zoo.mixed_float16_keras3(keras).export(str(path), verbose=False),
            "sink": lambda: model_zoo.kitchen_sink_keras3(keras).export(str(path), verbose=False),
            "multi_io": lambda: model_zoo.multi_io_keras3(keras).export(str(path), verbose=False),
            "no_relu": lambda: model_zoo.no_relu_keras3(keras).export(str(path), verbose=False),
            "int_input": lambda: model_zoo.int_input_module(path),
            "shapes_cnn": lambda: shutil.copytree(REPO / "testdata" / "shapes_cnn", path),  # the shipped model
            "default_names_tf_keras": lambda: model_zoo.default_names_tf_keras(path),
            "default_names_tf1": lambda: model_zoo.default_names_tf1(path),
            "default_names_keras3": lambda: model_zoo.default_names_keras3(keras).export(str(path), verbose=False),
            "default_names_keras3.keras": lambda: model_zoo.default_names_keras3(keras).save(str(path)),
            "nested_default_names_keras3": lambda: model_zoo.nested_default_names_keras3(keras).export(
                str(path), verbose=False),
            "nested_default_names_keras3.keras": lambda: model_zoo.nested_default_names_keras3(keras).save(str(path)),
            "hard_mix": lambda: model_zoo.hard_mix_keras3(keras).export(str(path), verbose=False),
            "hard_mix.keras": lambda: model_zoo.hard_mix_keras3(keras).save(str(path)),
            "hard_mix.h5": lambda: model_zoo.hard_mix_keras3(keras).save(str(path)),
            "mobilenet_v3_gate": lambda: model_zoo.mobilenet_v3_gate_module(path),
            "smooth_activations": lambda: model_zoo.smooth_activations_keras3(keras).export(str(path), verbose=False),
        }
        builders[name]()
        return path

    @staticmethod
    def spec(kind: str):
        """A numpy_reference spec: one of ref.SPEC_KINDS, or a sigmoid classifier: "binary" (one
        unit, its dense layer's activation sigmoid) or "multilabel" (5 units, a sigmoid layer)."""
        if kind == "binary":
            spec = ref.random_spec("mlp", seed=1, input_shape=INPUT_SHAPE, num_classes=1)
            return spec[:-1] + [dict(spec[-1], activation="sigmoid")]
        if kind == "multilabel":
            return ref.random_spec("mlp", seed=1, input_shape=INPUT_SHAPE) + [{"type": "sigmoid", "name": "sigmoid"}]
        return ref.random_spec(kind, seed=1, input_shape=INPUT_SHAPE)

    def converted(self, name: str, **options):
        """(export dir, report) of `name` converted with `options`, converted once per session.

        The session's source guard (_sources_are_never_changed) checks the source is untouched."""
        import gbp_rewrite

        key = conversion_key(name, **options)
        if key not in self._converted:
            destination = self.root / "exports" / f"{name}-{len(self._converted)}"
            report = gbp_rewrite.convert(self.model(name), destination, **options)
            self._converted[key] = (destination, report)
        return self._converted[key]

    def loaded(self, path) -> object:
        """tf.saved_model.load(path), loaded once per session."""
        path = Path(path)
        if path not in self._loaded:
            self._loaded[path] = tf.saved_model.load(str(path))
        return self._loaded[path]


def conversion_key(*names: str, **options) -> tuple:
    """A cache key for one conversion. Options equal to convert's defaults are left out, so that
    converted("m") and converted("m", rule="guided") are the same conversion, made once."""
    defaults = _convert_defaults()
    chosen = {k: v for k, v in options.items() if not (k in defaults and v == defaults[k])}
    return (*names, tuple(sorted((k, str(v)) for k, v in chosen.items())))


@functools.cache
def _convert_defaults() -> dict[str, object]:
    """gbp_rewrite.pipeline.convert's keyword defaults (through the guard's functools.wraps)."""
    from gbp_rewrite import pipeline

    parameters = inspect.signature(pipeline.convert).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session", autouse=True)
def _sources_are_never_changed():
    """Every gbp_rewrite.convert call of the session leaves its source as it was, failed or not:
    files byte for byte, an in-memory Keras model's weights value for value (issue #7).

    Session-scoped, and autouse fixtures are set up first within their scope, so conversions made
    in module- and session-scoped fixtures are checked too."""
    import gbp_rewrite
    from gbp_rewrite import pipeline

    convert = pipeline.convert

    @functools.wraps(convert)
    def checked_convert(source, destination, **options):
        before = source_fingerprint(source)
        try:
            return convert(source, destination, **options)
        finally:
            assert source_fingerprint(source) == before, f"converting {source} changed the source"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "convert", checked_convert)
        patch.setattr(gbp_rewrite, "convert", checked_convert)
        yield


def serving_check_build():
    """gbp_rewrite.deploy.serving_check_build: builds the C++ serving check into the user cache."""
    from gbp_rewrite.deploy import serving_check_build as module

    return module


@pytest.fixture(scope="session", autouse=True)
def _serving_check_cache(tmp_path_factory):
    """The whole session builds the C++ serving check into its own XDG_CACHE_HOME (once, on first
    use, shared by every test, subprocesses included), never into the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        patch.delenv("GBP_REWRITE_CACHE_DIR", raising=False)
        patch.delenv("GBP_REWRITE_SERVING_CHECK", raising=False)
        yield


@pytest.fixture(scope="session")
def serving_check_binary(_serving_check_cache) -> Path:
    """The C++ serving check, built once per session into the session's cache (about 35 s).

    Without a C++ compiler the tests that need it fail (a CI without g++ must not pass by skipping
    them), unless GBP_REWRITE_ALLOW_NO_CXX=1 says so on purpose: then they skip. A failing
    compilation fails them.
    """
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        reason = f"no C++ compiler ({compiler}) on PATH: cannot build the C++ serving check"
        if os.environ.get(ALLOW_NO_CXX) == "1":
            pytest.skip(reason)
        pytest.fail(f"{reason} (set {ALLOW_NO_CXX}=1 to skip the tests that need it)")
    return serving_check_build().build()


def cli_command(*args: str) -> list[str]:
    """The installed console script when there is one, else the module."""
    script = Path(sys.executable).with_name("gbp-rewrite")
    if script.exists():
        return [str(script), *map(str, args)]
    return [sys.executable, "-m", "gbp_rewrite.cli", *map(str, args)]


def run_cli_concurrently(commands: dict, *, timeout: float = 600, **popen) -> dict[str, subprocess.CompletedProcess]:
    """Start every command (name -> argv, e.g. from cli_command) at once; name -> its
    CompletedProcess, with text stdout and stderr. `popen` goes to every subprocess.Popen (cwd=...).

    communicate() drains both pipes while it waits, so no process blocks on a full pipe; `timeout`
    bounds the whole batch, and on a timeout the processes still running are killed."""
    processes = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
                 for name, argv in commands.items()}
    deadline = time.monotonic() + timeout
    try:
        return {name: _completed(process, deadline) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


def _completed(process: subprocess.Popen, deadline: float) -> subprocess.CompletedProcess:
    """Wait for `process` until `deadline` (time.monotonic()), reading its output."""
    stdout, stderr = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def reference_inputs(spec, *, batch=6, seed=3, margin=1e-3, dtype=np.float32, input_shape=INPUT_SHAPE):
    """`batch` inputs of `dtype` whose ReLU masks and max-pool choices are the same in float64 as
    in `dtype`: their kink margin (numpy_reference.kink_margin) exceeds `margin`."""
    for attempt in range(REFERENCE_INPUT_TRIES):
        x = ref.random_inputs(input_shape, batch=batch * 4, seed=seed + 1000 * attempt).astype(dtype)
        good = x[ref.kink_margin(spec, x) > margin]
        if len(good) >= batch:
            return good[:batch]
    raise AssertionError(f"fewer than {batch} of {batch * 4} inputs have a kink margin above {margin} "
                         f"in each of {REFERENCE_INPUT_TRIES} tries: lower the margin or the batch")


def assert_close_relative(actual, expected, rtol=1e-5, *, example_floor=0.1):
    """|actual - expected| <= rtol * scale, with the scale of the whole batch (max|expected|) and,
    for a batch (leading axis), of each example alone: a small example's map is not hidden by a
    large one. An example's own scale is floored at `example_floor` times the batch's: float32
    cannot do better on an example whose map nearly vanishes (a saturated softmax's probability
    gradient is a difference of nearly equal terms), and the batch check still holds it."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected))
    assert scale > 0, "the reference is all zeros: the test would prove nothing"
    worst = np.max(np.abs(actual - expected))
    assert worst <= rtol * scale, f"max abs difference {worst:.3g} > {rtol} * {scale:.3g}"
    if expected.ndim < 2:
        return
    per_example = lambda a: np.max(np.abs(a).reshape(len(a), -1), axis=1)  # noqa: E731
    own = np.maximum(per_example(expected), example_floor * scale)
    errors = per_example(actual - expected)
    bad = np.flatnonzero(errors > rtol * own)
    assert not bad.size, (
        f"example {bad[0]}: max abs difference {errors[bad[0]]:.3g} > {rtol} * {own[bad[0]]:.3g} "
        f"(its own scale; {len(bad)} of {len(own)} examples off)")
