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
    line = _one_line_error(done, "custom.keras", "model.export(DIR)", "gbp-rewrite convert DIR DST")
    assert "{" not in line and len(line) < 700, line
    assert "tf_keras" not in line  # not the tf-keras advice: the route that works for a custom class
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- pictures people can read

def _decode(path):
    import tensorflow as tf

    return tf.io.decode_png(tf.io.read_file(str(path))).numpy()


def test_explain_figure_with_labels_and_drawing_flags(shapes, image, tmp_path):
    import csv
    import json

    import numpy as np

    from conftest import REPO
    from gbp_rewrite.pictures import font

    out = tmp_path / "out"
    done = _run("explain", shapes, "--image", image, "--out", out, "--labels",
                REPO / "testdata" / "shapes_cnn_labels.txt", "--colormap", "gray", "--alpha", "1",
                "--clip_percentile", "100", "--sign", "positive")
    assert done.returncode == 0, done.stderr
    (row,) = csv.DictReader((out / "results.csv").open())
    assert row["label"] == ["circle", "square", "triangle", "cross"][int(row["class"])]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["colormap"], summary["alpha"], summary["sign"]) == ("gray", 1.0, "positive")
    photo = np.kron(_decode(image)[:, :, :3], np.ones((7, 7, 1), np.uint8))  # 32 px -> 224, by hand
    heat = _decode(out / f"{image.stem}_heatmap.png")
    overlay = _decode(out / f"{image.stem}_overlay.png")
    assert heat.shape == overlay.shape == _decode(out / f"{image.stem}_guided.png").shape == (224, 224, 3)
    # gray colormap (colour = the heat's grey), alpha 1: overlay = photo + heat * (colour - photo);
    # zero heat leaves the photo as it is
    zero = heat[:, :, 0] == 0
    assert zero.any() and (~zero).any()
    np.testing.assert_array_equal(overlay[zero], photo[zero])
    colour = heat.astype(np.float64)
    expected = photo + colour / 255.0 * (colour - photo)
    assert np.max(np.abs(overlay - expected)) <= 1.0
    figure = _decode(out / f"{image.stem}_figure.png")
    caption = f"{row['label']} (class {row['class']})  score {float(row['score']):.4f}"
    scale = 3  # the caption's font scale on 224 px panels
    text = font.text_image(caption, scale=scale)
    # the caption is drawn pixel for pixel: crisp black ink on white, no grey edges
    found = [(r, c) for r in range(0, 40) for c in range(0, 40)
             if np.array_equal(figure[r:r + text.shape[0], c:c + text.shape[1], 0], 255 - text)]
    assert found, "the caption is not in the figure"
    r, c = found[0]
    assert set(np.unique(figure[r:r + text.shape[0], c:c + text.shape[1]])) == {0, 255}
    # the photo and the overlay are panels of the figure, side by side, pixel for pixel
    top = next(y for y in range(r, r + 80) if np.array_equal(figure[y, 12:12 + 224], photo[0]))
    row = figure[top:top + 224]
    for panel in (photo, overlay):
        assert any(np.array_equal(row[:, x:x + 224], panel) for x in range(row.shape[1] - 223))


def test_explain_refuses_bad_drawing_options_and_labels(shapes, image, tmp_path):
    bad_alpha = _run("explain", shapes, "--image", image, "--out", tmp_path / "a", "--alpha", "2")
    assert bad_alpha.returncode == 2 and "--alpha" in bad_alpha.stderr and "[0.0, 1.0]" in bad_alpha.stderr
    bad_sign = _run("explain", shapes, "--image", image, "--out", tmp_path / "b", "--sign", "both")
    assert bad_sign.returncode == 2 and "abs" in bad_sign.stderr and "negative" in bad_sign.stderr
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    done = _run("explain", shapes, "--image", image, "--out", tmp_path / "c", "--labels", three)
    _one_line_error(done, "--labels names 3 classes", "has 4")
    assert not (tmp_path / "c").exists()


def test_top_k_explains_the_best_classes(shapes, image, tmp_path):
    import csv

    import numpy as np
    import tensorflow as tf

    out = tmp_path / "out"
    labels = tmp_path / "labels.json"  # a JSON list this time
    labels.write_text('["circle", "square", "triangle", "cross"]')
    done = _run("explain", shapes, "--image", image, "--out", out, "--top_k", "3", "--labels", labels)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    pixels = _decode(image)[None, :, :, :3] / 255.0
    served = tf.saved_model.load(str(shapes)).signatures
    scores = served["serving_default"](image=tf.constant(pixels, tf.float32))["output_0"].numpy()[0]
    assert [int(r["class"]) for r in rows] == list(np.argsort(-scores)[:3])
    for r in rows:
        cls = int(r["class"])
        assert float(r["score"]) == pytest.approx(scores[cls], rel=1e-6)
        assert r["label"] == ["circle", "square", "triangle", "cross"][cls]
        assert (out / r["figure"]).is_file() and r["figure"] == f"{image.stem}_top{r['rank']}_figure.png"
        direct = served["explain_class"](image=tf.constant(pixels, tf.float32),
                                         class_index=tf.constant([cls], tf.int64))
        assert int(direct["explained_class"][0]) == cls


def test_rerun_removes_its_own_pictures_only_and_dir_recursive(shapes, tmp_path):
    from conftest import REPO

    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    shutil.copy(REPO / "testdata" / "images" / "circle_0.png", images / "a.png")
    shutil.copy(REPO / "testdata" / "images" / "square_0.png", images / "sub" / "b.png")
    out = tmp_path / "out"
    first = _run("explain", shapes, "--dir", images, "--recursive", "--out", out)
    assert first.returncode == 0, first.stderr
    assert {p.name for p in out.glob("*.png")} == {f"{s}_{k}.png" for s in "ab"
                                                   for k in ("figure", "heatmap", "overlay", "guided")}
    (out / "mine.png").write_bytes((out / "a_figure.png").read_bytes())  # not the run's: kept
    (images / "sub" / "b.png").unlink()
    second = _run("explain", shapes, "--dir", images, "--recursive", "--out", out)
    assert second.returncode == 0, second.stderr
    assert {p.name for p in out.glob("*.png")} == {"mine.png"} | {f"a_{k}.png" for k in
                                                                  ("figure", "heatmap", "overlay", "guided")}
    flat = _run("explain", shapes, "--dir", images, "--out", tmp_path / "flat")
    assert flat.returncode == 0 and "explained 1 of 1" in flat.stdout
    usage = _run("explain", shapes, "--image", images / "a.png", "--recursive", "--out", tmp_path / "x")
    assert usage.returncode == 2 and "--recursive goes with --dir" in usage.stderr


# ---------------------------------------------------------------- untrained models

def test_untrained_model_is_warned_about_at_convert_and_explain(image, tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(2, 3, activation="relu", name="conv")(inputs)
    head = keras.layers.Dense(3, kernel_initializer="zeros", name="head")(keras.layers.Flatten()(hidden))
    source = tmp_path / "untrained.keras"
    keras.Model(inputs, head).save(source)
    converted = _run("convert", source, tmp_path / "export")
    assert converted.returncode == 0, converted.stderr
    assert ("warning: the model looks untrained or saturated: on the probe batch, all 3 class scores "
            "are equal") in converted.stdout
    explained = _run("explain", tmp_path / "export", "--image", image, "--out", tmp_path / "out")
    assert explained.returncode == 0, explained.stderr
    warnings = [line for line in explained.stderr.splitlines() if "looks untrained" in line]
    assert len(warnings) == 1 and "the first 1 image(s)" in warnings[0], explained.stderr


def test_constant_outputs_rule():
    import numpy as np

    from gbp_rewrite.conventions import constant_outputs

    assert constant_outputs(np.zeros((4, 3))).startswith("all 3 class scores")
    assert constant_outputs(np.tile([[0.1, 0.7, 0.2]], (4, 1))).startswith("every example")
    assert constant_outputs(np.array([[0.1, 0.7, 0.2], [0.3, 0.3, 0.4]])) is None
    assert constant_outputs(np.array([[5.0, 5.0 + 1e-3]])) is None  # a real, small difference


def test_inspect_json_gives_dtype_and_shape_apart(zoo):
    import json

    done = _run("inspect", zoo.model("shapes_cnn"), "--json")
    assert done.returncode == 0, done.stderr
    signature = json.loads(done.stdout)["signatures"]["serving_default"]
    assert signature["inputs"]["image"]["dtype"] == "float32"
    assert signature["inputs"]["image"]["shape"] == [None, 32, 32, 3]
    (output,) = signature["outputs"].values()
    assert output["dtype"] == "float32" and output["shape"] == [None, 4]


def test_tf_keras_h5_with_depthwise_conv_gets_the_savedmodel_route(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")

    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.DepthwiseConv2D(3, activation="relu")(inputs)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2)(tf_keras.layers.Flatten()(x)))
    path = tmp_path / "mobile.h5"
    model.save(path)
    done = _run("convert", path, tmp_path / "out")
    _one_line_error(done, "Keras 3 cannot load", "DepthwiseConv2D", "tf_keras.models.load_model(path).save(DIR",
                    "gbp-rewrite convert DIR DST")
    assert not (tmp_path / "out").exists()


def test_command_line_copies_of_drawing_choices_match_render():
    from gbp_rewrite.cli import common
    from gbp_rewrite.pictures import render

    assert common.COLORMAPS == render.COLORMAP_NAMES and common.SIGNS == render.SIGNS
