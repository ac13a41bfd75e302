"""Shared fixtures: small models built once per session, conversions cached, a CLI runner."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import model_zoo  # noqa: E402
import numpy_reference as ref  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (8, 8, 3)


class Zoo:
    """Builds each test model on first use and keeps it for the session."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}
        self._converted: dict[tuple, tuple[Path, object]] = {}

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
            "mixed_float16": lambda: model_zoo.mixed_float16_keras3(keras, path),
            "sink": lambda: model_zoo.kitchen_sink_keras3(keras).export(str(path), verbose=False),
            "multi_io": lambda: model_zoo.multi_io_keras3(keras).export(str(path), verbose=False),
            "no_relu": lambda: model_zoo.no_relu_keras3(keras).export(str(path), verbose=False),
            "int_input": lambda: model_zoo.int_input_module(path),
            "shapes_cnn": lambda: shutil.copytree(REPO / "testdata" / "shapes_cnn", path),  # the shipped model
        }
        builders[name]()
        return path

    @staticmethod
    def spec(kind: str):
        return ref.random_spec(kind, seed=1, input_shape=INPUT_SHAPE)

    def converted(self, name: str, **options):
        """(export dir, report) of `name` converted with `options`, converted once per session."""
        import gbp_rewrite

        key = (name, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in self._converted:
            destination = self.root / "exports" / f"{name}-{len(self._converted)}"
            source = self.model(name)
            before = model_zoo.tree_digest(source)
            report = gbp_rewrite.convert(source, destination, **options)
            assert model_zoo.tree_digest(source) == before, f"converting {name} changed the source"
            self._converted[key] = (destination, report)
        return self._converted[key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(autouse=True)
def _sources_are_never_changed(monkeypatch):
    """Every gbp_rewrite.convert call of every test leaves its source as it was, failed or not:
    files byte for byte, an in-memory Keras model's weights value for value (issue #7)."""
    import gbp_rewrite
    from gbp_rewrite import converter

    convert = converter.convert

    def checked_convert(source, destination, **options):
        before = source_fingerprint(source)
        try:
            return convert(source, destination, **options)
        finally:
            assert source_fingerprint(source) == before, f"converting {source} changed the source"

    monkeypatch.setattr(converter, "convert", checked_convert)
    monkeypatch.setattr(gbp_rewrite, "convert", checked_convert)


def source_fingerprint(source) -> object:
    """sha256 of a source file or of every file of a source directory; a Keras model's weights."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
        return model_zoo.tree_digest(path)
    weights = getattr(source, "weights", None)
    return None if weights is None else [np.array(w.numpy()).tobytes() for w in weights]


@pytest.fixture(scope="session")
def serving_check_binary() -> Path:
    """tools/serving_check, built once per session (a stat() when it is up to date).

    Skipped only where there is no C++ compiler; a failing compilation fails the tests.
    """
    import importlib.util

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++) on PATH: cannot build tools/serving_check")
    # Loaded under its own name: "build" is also the name of pypa's build package.
    spec = importlib.util.spec_from_file_location(
        "serving_check_build", REPO / "tools" / "serving_check" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


def cli_command(*args: str) -> list[str]:
    """The installed console script when there is one, else the module."""
    script = Path(sys.executable).with_name("gbp-rewrite")
    if script.exists():
        return [str(script), *map(str, args)]
    return [sys.executable, "-m", "gbp_rewrite.cli", *map(str, args)]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout)


def reference_inputs(spec, *, batch=6, seed=3, margin=1e-3):
    """Inputs whose ReLU masks and max-pool choices are the same in float32 and float64."""
    rng_seed = seed
    while True:
        x = ref.random_inputs(INPUT_SHAPE, batch=batch * 4, seed=rng_seed)
        good = x[ref.kink_margin(spec, x) > margin]
        if len(good) >= batch:
            return good[:batch].astype(np.float32)
        rng_seed += 1000


def assert_close_relative(actual, expected, rtol=1e-5):
    """|actual - expected| <= rtol * max|expected|, elementwise over the whole batch."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected))
    assert scale > 0, "the reference is all zeros: the test would prove nothing"
    worst = np.max(np.abs(actual - expected))
    assert worst <= rtol * scale, f"max abs difference {worst:.3g} > {rtol} * {scale:.3g}"
