"""Issue 13's practitioner items through the command line: refusals before any work, the
message checked (and nothing left behind)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import cli_command
from gbp_rewrite.conventions import some_names

NO_CPP = {**os.environ, "GBP_REWRITE_SERVING_CHECK": "none"}


def _run(*args, env=None):
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=600, env=env)


def _one_line_error(done, *words):
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def shapes(zoo):
    return zoo.converted("shapes_cnn")[0]


@pytest.fixture(scope="module")
def image():
    from conftest import REPO

    return REPO / "testdata" / "images" / "circle_0.png"


def test_explain_dir_that_does_not_exist_is_refused_first(shapes, tmp_path):
    done = _run("explain", shapes, "--dir", tmp_path / "no_such_folder", "--out", tmp_path / "out")
    _one_line_error(done, "--dir", "no_such_folder", "does not exist")
    assert not (tmp_path / "out").exists()


def test_converting_an_explainable_export_is_refused(shapes, zoo, tmp_path):
    done = _run("convert", shapes, tmp_path / "again")
    line = _one_line_error(done, "already an explainable export", "original model")
    assert str(zoo.model("shapes_cnn")) in line  # the report names the original
    assert not (tmp_path / "again").exists()


def test_verify_of_a_model_never_converted_fails(zoo):
    done = _run("verify", zoo.model("shapes_cnn"), env=NO_CPP)
    assert done.returncode == 1, done.stdout
    assert "FAIL  explainable outputs: no signature returns a saliency output" in done.stdout
    assert "PASS" not in done.stdout.splitlines()[-1]


def test_serving_base_path_uses_its_highest_version(shapes, image, tmp_path):
    base = tmp_path / "base"
    for version in ("1", "3"):
        shutil.copytree(shapes, base / version)
    (base / "2").mkdir()  # a half-written version is no SavedModel: not taken
    explained = _run("explain", base, "--image", image, "--out", tmp_path / "out")
    assert explained.returncode == 0, explained.stderr
    notes = [line for line in explained.stderr.splitlines() if "TF Serving base path" in line]
    assert len(notes) == 1 and str(base / "3") in notes[0], explained.stderr
    requested = _run("request", base, "--image", image, "--out", tmp_path / "body.json")
    assert requested.returncode == 0, requested.stderr
    assert "highest version" in requested.stderr and str(base / "3") in requested.stderr


def test_names_in_messages_stop_at_ten():
    text = some_names([f"layer{i}" for i in range(13)])
    assert text.startswith("layer0, layer1,") and "layer9" in text and "layer10" not in text
    assert text.endswith(", and 3 more (see inspect)")
    assert some_names(["a", "b"]) == "a, b"


def test_keras_errors_do_not_dump_the_config(tmp_path):
    import keras

    @keras.saving.register_keras_serializable(package="gbp_test")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(Doubler(name="doubler")(inputs)))
    path = tmp_path / "custom.keras"
    model.save(path)
    done = _run("convert", path, tmp_path / "out")  # a fresh process: Doubler is not registered
    line = _one_line_error(done, "custom.keras")
    assert "{" not in line and len(line) < 500, line
    assert not (tmp_path / "out").exists()
