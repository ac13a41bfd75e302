"""`explain` (saliency pictures of image files) and the `saliency_map` conversion option.

The shipped model (testdata/shapes_cnn) is converted once per session (with saliency_map=True)
and run on the shipped images, whose masks say where each shape is.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
import model_zoo
import numpy_reference as ref
from conftest import REPO, assert_close_relative, cli_command
from gbp_rewrite import signatures
from gbp_rewrite.pictures import explainer
from gbp_rewrite.pictures import images
from gbp_rewrite.cli.progress import Progress
from gbp_rewrite.errors import ImageError, OptionError, SignatureError, SourceModelError
from gbp_rewrite.graph.savedmodel import TensorDesc

IMAGES = REPO / "testdata" / "images"
LABELS = json.loads((IMAGES / "labels.json").read_text())
SAMPLES = [str(IMAGES / name) for name in LABELS]
DOCS_IMAGES = REPO / "docs" / "images"


@pytest.fixture(scope="module")
def shapes(zoo):
    """(export dir, conversion report) of the shipped model, with the saliency_map output."""
    return zoo.converted("shapes_cnn", saliency_map=True)


@pytest.fixture(scope="module")
def shapes_model(shapes):
    return explainer.load_model(shapes[0])


def _decode(path) -> np.ndarray:
    return tf.io.decode_image(tf.io.read_file(str(path)), expand_animations=False).numpy()


def _direct(export_dir, pixels, class_index=None):
    """The export's outputs for float pixels, called without the explain pipeline."""
    signatures = tf.saved_model.load(str(export_dir)).signatures
    if class_index is None:
        outputs = signatures["serving_default"](image=tf.constant(pixels, tf.float32))
    else:
        outputs = signatures["explain_class"](image=tf.constant(pixels, tf.float32),
                                              class_index=tf.constant(class_index, tf.int64))
    return {k: v.numpy() for k, v in outputs.items()}


# ---------------------------------------------------------------- the saliency itself


def test_heat_lies_on_the_shape(shapes_model):
    """Mean |saliency| (max over channels) on the shape's mask is well above its mean off it."""
    results = [item for batch in explainer.explain_batches(shapes_model, SAMPLES, batch_size=3) for item in batch]
    assert [r.file for r in results] == SAMPLES
    ratios = {}
    for item in results:
        name = Path(item.file).name
        assert item.class_index == LABELS[name]["class_index"], name
        mask = _decode(IMAGES / LABELS[name]["mask"])[..., 0] > 127
        heat = np.abs(item.saliency).max(axis=-1)
        ratios[name] = heat[mask].mean() / heat[~mask].mean()
    assert min(ratios.values()) >= 1.5, ratios
    assert np.mean(list(ratios.values())) >= 2.5, ratios


def test_guided_map_of_the_shipped_model_is_the_reference_not_the_gradient(shapes, zoo):
    """The heat test above passes for the plain gradient too. Here the guided map must equal the
    numpy reference's guided backprop of the shipped model and differ materially from its true
    gradient (vanilla, also checked against the reference): a guided attr silently ignored fails."""
    import keras

    spec = model_zoo.keras_spec(keras.saving.load_model(REPO / "testdata" / "shapes_cnn.keras"))
    pixels = np.stack([_decode(path) for path in SAMPLES]).astype(np.float32) / 255.0
    guided = _direct(shapes[0], pixels)["saliency"]
    vanilla = _direct(zoo.converted("shapes_cnn", rule="vanilla")[0], pixels)["saliency"]
    expected_guided, classes = ref.saliency(spec, pixels, rule="guided")
    expected_vanilla, _ = ref.saliency(spec, pixels, rule="vanilla")
    assert_close_relative(guided, expected_guided, rtol=1e-4)
    assert_close_relative(vanilla, expected_vanilla, rtol=1e-4)
    per_image = lambda a: np.sqrt((a.reshape(len(a), -1) ** 2).sum(axis=1))  # noqa: E731
    difference = per_image(guided - vanilla) / per_image(vanilla)
    assert np.all(difference > 0.2), difference  # every image: not the plain gradient
    assert np.all(per_image(expected_guided - expected_vanilla) / per_image(expected_vanilla) > 0.2)


def test_pipeline_feeds_the_model_what_a_direct_call_gets(shapes, shapes_model):
    """Decoding, resizing (same size: identity) and unit preprocessing equal x / 255 in numpy."""
    pixels = np.stack([_decode(p) for p in SAMPLES]).astype(np.float64) / 255.0
    want = _direct(shapes[0], pixels)
    got = [item for batch in explainer.explain_batches(shapes_model, SAMPLES, batch_size=5) for item in batch]
    np.testing.assert_allclose(np.stack([g.saliency for g in got]), want["saliency"], rtol=1e-5, atol=1e-7)
    classes = want["explained_class"]
    np.testing.assert_array_equal([g.class_index for g in got], classes)
    np.testing.assert_allclose([g.score for g in got], want["output_0"][np.arange(len(classes)), classes], rtol=1e-6)


@pytest.mark.parametrize("mode", sorted(images.PREPROCESSING))
def test_preprocess_modes_match_keras_formulas(mode):
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 4, 5, 3))
    expected = {
        "unit": x / 255.0,
        "symmetric": x / 127.5 - 1.0,
        "caffe": x[..., ::-1] - np.array([103.939, 116.779, 123.68]),
        "none": x,
    }[mode]
    np.testing.assert_allclose(images.preprocess(tf.constant(x, tf.float32), mode).numpy(), expected,
                               rtol=1e-5, atol=1e-4)


def test_unknown_preprocess_lists_the_modes():
    with pytest.raises(OptionError, match="'imagenet'.*unit, symmetric, caffe, none"):
        images.check_preprocess("imagenet")


# ---------------------------------------------------------------- pictures and records


def test_pictures_and_records(shapes, tmp_path):
    """PNGs decode at the expected sizes (the image's own size, enlarged by a whole factor to at
    least 224 px); CSV and JSON agree with a direct call of the model; --class explains the given class."""
    big = tmp_path / "in" / "big_square.jpg"  # 48 x 40 JPEG: resized for the model
    big.parent.mkdir()
    source = _decode(IMAGES / "square_0.png")
    big_pixels = tf.image.resize(source, (48, 40), method="nearest").numpy().astype(np.uint8)
    big.write_bytes(tf.io.encode_jpeg(big_pixels, quality=95).numpy())
    inputs = [str(IMAGES / "circle_0.png"), str(big)]

    out = tmp_path / "out"
    summary = gbp_rewrite.explain(shapes[0], inputs, out_dir=out, batch_size=1)
    assert (summary.total, summary.explained, summary.failed) == (2, 2, [])
    sizes = {"circle_0": (224, 224), "big_square": (288, 240)}  # 32 x 7; 48 x 40 times 6
    for stem, size in sizes.items():
        for kind in ("heatmap", "guided", "overlay"):
            assert _decode(out / f"{stem}_{kind}.png").shape == (*size, 3), (stem, kind)
        assert _decode(out / f"{stem}_figure.png").shape[1] > 3 * size[1]

    rows = list(csv.DictReader((out / "results.csv").open()))
    record = json.loads((out / "summary.json").read_text())
    assert [r["file"] for r in rows] == [i["file"] for i in record["images"]] == inputs
    assert record["counts"] == {"images": 2, "explained": 2, "failed": 0, "skipped": 0}
    direct = _direct(shapes[0], _decode(IMAGES / "circle_0.png")[None] / 255.0)
    top = int(direct["explained_class"][0])
    assert int(rows[0]["class"]) == record["images"][0]["class"] == top
    assert float(rows[0]["score"]) == pytest.approx(direct["output_0"][0, top], rel=1e-6)
    assert record["images"][0]["outputs"] == {k: f"circle_0_{k}.png" for k in ("figure", "heatmap", "overlay", "guided")}

    other = (top + 1) % 4
    by_class = gbp_rewrite.explain(shapes[0], inputs[:1], out_dir=tmp_path / "by_class", class_index=other)
    assert by_class.explained == 1
    rows = list(csv.DictReader((tmp_path / "by_class" / "results.csv").open()))
    direct = _direct(shapes[0], _decode(IMAGES / "circle_0.png")[None] / 255.0, class_index=[other])
    assert int(rows[0]["class"]) == other
    assert float(rows[0]["score"]) == pytest.approx(direct["output_0"][0, other], rel=1e-6)


def test_results_are_written_batch_by_batch(shapes, tmp_path):
    """Each batch is in results.csv before the next runs: nothing piles up in memory."""
    seen = []

    def progress(done, total):
        lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
        seen.append((done, total, len(lines) - 1))

    gbp_rewrite.explain(shapes[0], SAMPLES, out_dir=tmp_path / "out", batch_size=3, progress=progress)
    assert seen == [(3, 8, 3), (6, 8, 6), (8, 8, 8)]


def test_grey_images_are_refused_or_converted_on_request(shapes, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    grey = np.mean(_decode(IMAGES / "cross_0.png"), axis=-1, keepdims=True).astype(np.uint8)
    (folder / "grey.png").write_bytes(tf.io.encode_png(grey).numpy())
    refused = gbp_rewrite.explain(shapes[0], folder, out_dir=tmp_path / "refused")
    assert refused.explained == 0
    assert "grey-scale (1 channel)" in refused.failed[0].reason and "--grayscale_to_rgb" in refused.failed[0].reason
    converted = gbp_rewrite.explain(shapes[0], folder, out_dir=tmp_path / "converted", grayscale_to_rgb=True)
    assert converted.explained == 1 and not converted.failed
    assert _decode(tmp_path / "converted" / "grey_overlay.png").shape == (224, 224, 3)


def test_same_file_names_get_distinct_pictures():
    stems = explainer._unique_stems(["a/x.png", "b/x.png", "x_2.jpg", "c/x.jpg"])
    assert stems == ["x", "x_3", "x_2", "x_4"]


def test_bad_options_and_inputs(shapes, tmp_path):
    with pytest.raises(OptionError, match="--class 4 is out of range.*4 classes"):
        gbp_rewrite.explain(shapes[0], SAMPLES[:1], out_dir=tmp_path / "a", class_index=4)
    assert not (tmp_path / "a").exists()  # refused before the output folder is made
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no image files"):
        gbp_rewrite.explain(shapes[0], tmp_path / "empty", out_dir=tmp_path / "b")


# ---------------------------------------------------------------- models explain cannot use


def test_non_explainable_model_says_how_to_convert(zoo, tmp_path):
    plain = zoo.model("shapes_cnn")
    with pytest.raises(SourceModelError) as error:
        gbp_rewrite.explain(plain, SAMPLES[:1], out_dir=tmp_path / "out")
    message = str(error.value)
    assert not (tmp_path / "out").exists()  # refused before the output folder is made
    assert "not an explainable export" in message
    assert f"gbp-rewrite convert {plain} {plain}_explainable" in message
    with pytest.raises(SourceModelError, match="does not exist"):
        explainer.load_model(tmp_path / "nowhere")


# ---------------------------------------------------------------- the saliency_map output


def test_saliency_map_equals_numpy(shapes):
    export_dir, report = shapes
    pixels = np.stack([_decode(p) for p in SAMPLES]) / 255.0
    for outputs in (_direct(export_dir, pixels), _direct(export_dir, pixels, class_index=[1] * len(SAMPLES))):
        saliency, got = outputs["saliency"], outputs["saliency_map"]
        magnitude = np.abs(saliency.astype(np.float64)).max(axis=-1)
        want = magnitude / magnitude.max(axis=(1, 2), keepdims=True)
        assert got.dtype == np.float32 and got.shape == (len(SAMPLES), 32, 32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        assert got.max(axis=(1, 2)).tolist() == [1.0] * len(SAMPLES)
    assert report.saliency_maps == {"saliency_map": "saliency"}
    assert "saliency_map" in report.signatures["serving_default"]
    assert "saliency_map" in report.signatures["explain_class"]
    assert "saliency map  : saliency_map = max |saliency|" in report.to_text()
    assert "saliency map" in report.checks


def test_saliency_map_of_an_all_zero_saliency_is_zero_not_nan():
    saliency = tf.constant(np.stack([np.zeros((4, 5, 3)), np.full((4, 5, 3), -2.0)]), tf.float32)
    got = signatures._saliency_map(saliency).numpy()
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_array_equal(got[1], 1.0)



def test_an_output_not_of_class_scores_names_the_fix_that_applies():
    """--output is offered only when the signature has another output to choose."""
    inputs = {"x": TensorDesc("x", "x:0", tf.float32, (None, 10))}
    grid = TensorDesc("y", "y:0", tf.float32, (None, 2, 3))
    with pytest.raises(SignatureError, match=r"\[\?, 2, 3\].*end it in a Reshape to \[batch, classes\]\)$"):
        signatures.make_plan("serving_default", inputs, {"y": grid})
    scores = TensorDesc("z", "z:0", tf.float32, (None, 3))
    with pytest.raises(SignatureError, match=r"\(choose another with --output\)$"):
        signatures.make_plan("serving_default", inputs, {"y": grid, "z": scores}, output="y")

def test_saliency_map_refuses_inputs_that_are_not_images(zoo, tmp_path):
    inputs = {"x": TensorDesc("x", "x:0", tf.float32, (None, 10))}
    outputs = {"y": TensorDesc("y", "y:0", tf.float32, (None, 3))}
    assert signatures.make_plan("serving_default", inputs, outputs).saliency_maps == {}
    with pytest.raises(SignatureError, match=r"--saliency_map needs image inputs.*x: float32 \[\?, 10\]"):
        signatures.make_plan("serving_default", inputs, outputs, saliency_map=True)
    destination = tmp_path / "multi"
    with pytest.raises(SignatureError, match=r"--saliency_map needs image inputs.*meta"):
        gbp_rewrite.convert(zoo.model("multi_io"), destination, output="cls", saliency_map=True)
    assert not destination.exists()


# ---------------------------------------------------------------- progress line


def test_progress_line_counts_rate_and_time_left():
    stream = io.StringIO()
    progress = Progress("explain", "images", stream=stream, interval=3600)
    assert progress.line(250, 1000, 10.0) == "explain: 250/1000 images, 25.0 images/s, 30 s left"
    assert progress.line(10, 100000, 5.0) == "explain: 10/100000 images, 2.0 images/s, 13:53:15 left"
    assert progress.line(8, 8, 2.0) == "explain: 8/8 images, 4.0 images/s, done in 2 s"
    for done in (2, 4, 6, 8):
        progress(done, 8)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("explain: 2/8") and lines[1].startswith("explain: 8/8")


# ---------------------------------------------------------------- command line (one batch of processes)


def _readme_explain_argv() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)\n```", (REPO / "README.md").read_text(), flags=re.S)
    block = next(b for b in blocks if "gbp-rewrite explain" in b)
    lines = block.replace("\\\n", " ").splitlines()
    return shlex.split(next(line for line in lines if "gbp-rewrite explain" in line))


def _bad_folder(root: Path) -> Path:
    folder = root / "mixed"
    folder.mkdir()
    shutil.copy(IMAGES / "circle_1.png", folder / "good_circle.png")
    big = tf.image.resize(_decode(IMAGES / "triangle_0.png"), (64, 64), method="nearest").numpy()
    (folder / "good_triangle.jpg").write_bytes(tf.io.encode_jpeg(big.astype(np.uint8)).numpy())
    data = (IMAGES / "square_1.png").read_bytes()
    (folder / "corrupt.png").write_bytes(data[: len(data) // 2])
    (folder / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
    grey = np.mean(_decode(IMAGES / "cross_1.png"), axis=-1, keepdims=True).astype(np.uint8)
    (folder / "grey.png").write_bytes(tf.io.encode_png(grey).numpy())
    (folder / "notes.txt").write_text("labels live elsewhere\n")
    return folder


def test_command_line(shapes, tmp_path):
    export_dir = shapes[0]
    folder = _bad_folder(tmp_path)
    readme = _readme_explain_argv()
    assert readme[:3] == [".venv/bin/gbp-rewrite", "explain", "/tmp/shapes_cnn_explainable"], readme
    readme_out = readme.index("--out") + 1
    assert readme[readme_out] == "docs/images"
    readme[2], readme[readme_out] = str(export_dir), str(tmp_path / "readme")
    runs = {
        "folder": cli_command("explain", export_dir, "--dir", folder, "--out", tmp_path / "out", "--batch_size", "2"),
        "readme": cli_command(*readme[1:]),
    }
    processes = {name: subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, argv in runs.items()}
    done = {name: (p.communicate(timeout=600), p.returncode) for name, p in processes.items()}

    # A folder with a corrupt image, a non-image and a grey-scale one: the good ones are
    # explained, each bad one is named with its reason, a summary, exit status 1.
    (stdout, stderr), status = done["folder"]
    assert status == 1, stderr
    assert "explained 2 of 5 image(s)" in stdout
    reasons = dict(re.findall(r"^  (\S+): (.+)$", stdout, flags=re.M))
    assert reasons[str(folder / "corrupt.png")].startswith("corrupt or truncated image")
    assert reasons[str(folder / "not_an_image.jpg")].startswith("not an image")
    assert reasons[str(folder / "grey.png")].startswith("grey-scale (1 channel)")
    assert reasons[str(folder / "notes.txt")].startswith("not an image file name")
    assert re.search(r"explain: 5/5 images, [\d.]+ images/s, done in", stderr)
    assert stderr.strip().splitlines()[-1] == (
        f"gbp-rewrite: error: 3 of 5 image(s) could not be explained (listed above and in {tmp_path / 'out' / 'summary.json'})")
    assert "Traceback" not in stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"good_{s}_{k}.png" for s in ("circle", "triangle") for k in ("figure", "guided", "heatmap", "overlay"))
    assert _decode(out / "good_triangle_overlay.png").shape == (256, 256, 3)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(Path(r["file"]).name, r["status"]) for r in rows] == [
        ("corrupt.png", "failed"), ("good_circle.png", "explained"), ("good_triangle.jpg", "explained"),
        ("grey.png", "failed"), ("not_an_image.jpg", "failed")]
    assert json.loads((out / "summary.json").read_text())["counts"] == {
        "images": 5, "explained": 2, "failed": 3, "skipped": 1}

    # The README's command makes the pictures committed in docs/images (up to float noise).
    (stdout, stderr), status = done["readme"]
    assert status == 0, stderr
    made = sorted((tmp_path / "readme").glob("*.png"))
    assert made and [p.name for p in made] == sorted(p.name for p in DOCS_IMAGES.glob("*.png"))
    for path in made:
        difference = np.abs(_decode(path).astype(int) - _decode(DOCS_IMAGES / path.name).astype(int))
        assert difference.max() <= 3 and difference.mean() < 0.5, (
            f"docs/images/{path.name} is out of date; regenerate it with the README's explain command")
