"""gbp_rewrite.sanity: the randomisation and class-swap tests, their metrics, and the shipped model's direction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
from gbp_rewrite.errors import OptionError, SourceModelError
from gbp_rewrite.sanity_checks import metrics, randomize

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "testdata" / "shapes_cnn.keras"
IMAGES = REPO / "testdata" / "images"


def test_spearman_known_answers():
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert metrics.spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert metrics.spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (0.5, 0.5, 2) and (0, 1, 2): Pearson of those
    assert metrics.spearman(np.array([5.0, 5, 9]), np.array([1.0, 2, 3])) == pytest.approx(np.sqrt(3) / 2)
    assert metrics.spearman(np.zeros(4), np.arange(4.0)) == 0.0  # a constant map orders nothing


def test_ssim_of_a_map_with_itself_is_one_and_less_otherwise():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(16, 16)), rng.uniform(size=(16, 16))
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim(a, b) < 0.5


def test_reinitialize_draws_from_the_layers_own_initializers():
    import keras

    layer = keras.layers.Dense(3, kernel_initializer="zeros", bias_initializer="ones")
    layer.build((None, 2))
    layer.kernel.assign(np.full((2, 3), 7.0, np.float32))
    layer.bias.assign(np.full((3,), 7.0, np.float32))
    assert randomize.reinitialize(layer, seed=1) == ["kernel", "bias"]
    np.testing.assert_array_equal(layer.kernel.numpy(), np.zeros((2, 3)))
    np.testing.assert_array_equal(layer.bias.numpy(), np.ones(3))
    seeded = keras.layers.Dense(4, kernel_initializer="glorot_uniform")
    seeded.build((None, 3))
    randomize.reinitialize(seeded, seed=5)
    first = seeded.kernel.numpy().copy()
    randomize.reinitialize(seeded, seed=5)
    np.testing.assert_array_equal(seeded.kernel.numpy(), first)  # a fixed seed: reproducible
    randomize.reinitialize(seeded, seed=6)
    assert not np.array_equal(seeded.kernel.numpy(), first)


def test_weighted_layers_look_inside_nested_models():
    import keras

    inner_input = keras.Input((4, 4, 3))
    backbone = keras.Model(inner_input, keras.layers.Conv2D(2, 3, name="c1")(inner_input), name="backbone")
    outer_input = keras.Input((4, 4, 3))
    x = keras.layers.Flatten(name="flat")(backbone(outer_input))
    model = keras.Model(outer_input, keras.layers.Dense(2, name="d")(x))
    assert [layer.name for layer in randomize.weighted_layers(model)] == ["c1", "d"]


@pytest.fixture(scope="module")
def shapes_sanity(tmp_path_factory):
    import keras

    model = keras.saving.load_model(str(SHAPES))
    before = [w.numpy().copy() for w in model.weights]
    out = tmp_path_factory.mktemp("sanity")
    result = gbp_rewrite.sanity(model, IMAGES, out_dir=out, max_images=3)
    return result, out, model, before


def test_shipped_model_reproduces_the_papers_direction(shapes_sanity):
    """Guided saliency stays alike under cascading randomisation; Grad-CAM and the gradient do not."""
    result, _, _, _ = shapes_sanity
    guided = result.similarity("guided")
    assert guided > result.similarity("gradcam")
    assert guided > result.similarity("gradient")
    assert result.verdicts["guided"].startswith("FAILS")
    assert result.verdicts["gradcam"].startswith("passes")


def test_sanity_writes_table_json_and_chart(shapes_sanity):
    result, out, _, _ = shapes_sanity
    record = json.loads((out / "sanity.json").read_text())
    assert [s["step"] for s in record["steps"]] == list(range(1, len(result.steps) + 1))
    assert record["steps"][0]["layer"] == "predictions"  # the cascade starts at the output
    assert set(record["verdicts"]) == {"guided", "gradcam", "guided_gradcam", "gradient"}
    assert set(record["class_swap"]["guided"]) == {"spearman_abs", "spearman_signed", "ssim"}
    assert "verdicts:" in (out / "sanity.txt").read_text()
    chart = tf.io.decode_png((out / "sanity.png").read_bytes()).numpy()
    assert chart.shape[-1] == 3 and chart.std() > 0


def test_sanity_leaves_the_users_model_unchanged(shapes_sanity):
    _, _, model, before = shapes_sanity
    for weight, original in zip(model.weights, before):
        np.testing.assert_array_equal(weight.numpy(), original)


def test_savedmodel_is_refused_with_the_way_round(tmp_path):
    with pytest.raises(SourceModelError, match=r"pass the Keras model \(.keras or .h5\)"):
        gbp_rewrite.sanity(REPO / "testdata" / "shapes_cnn", IMAGES, out_dir=tmp_path)


def test_layers_to_randomize_out_of_range(tmp_path):
    with pytest.raises(OptionError, match=r"--layers_to_randomize 99 is out of range; the model has \d+ layers"):
        gbp_rewrite.sanity(SHAPES, IMAGES, out_dir=tmp_path, layers_to_randomize=99, max_images=1)


def test_command_line(tmp_path):
    from conftest import cli_command, run_cli_concurrently

    results = run_cli_concurrently({
        "sanity": cli_command("sanity", SHAPES, "--dir", IMAGES, "--out", tmp_path / "s",
                              "--layers_to_randomize", "1", "--max_images", "1", "--json"),
        "no out": cli_command("sanity", SHAPES, "--dir", IMAGES),
        "cam layer": cli_command("convert", REPO / "testdata" / "shapes_cnn", tmp_path / "c", "--cam_layer", "nope"),
    })
    done = results["sanity"]
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert [s["layer"] for s in record["steps"]] == ["predictions"] and len(record["images"]) == 1
    assert results["no out"].returncode == 2 and "needs --out" in results["no out"].stderr
    wrong = results["cam layer"]
    assert wrong.returncode == 1 and not (tmp_path / "c").exists()
    assert wrong.stderr.strip().count("\n") == 0 and "--cam_layer 'nope' names no layer" in wrong.stderr
