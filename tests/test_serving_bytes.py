"""Image bytes in, compact maps out (gbp_rewrite.serving.serving_signatures, issue 16 parts 1 and 2).

References: `explain`'s own pipeline on the same files (tf.data decode + the float signature,
and the heat map PNGs `explain` writes), PNG/JPEG headers parsed here for the image sizes, and
numpy (np.percentile, rint) for the compact maps.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
from gbp_rewrite.pictures import explainer, images, render
from gbp_rewrite.serving import serving_signatures as serving_bytes
from gbp_rewrite.errors import GbpError, OptionError, SignatureError

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted(str(p) for p in (REPO / "testdata" / "images").glob("*.png"))
OPTIONS = dict(image_bytes=True, saliency_map_dtype="uint8", saliency_png=True)


@pytest.fixture(scope="module")
def export(zoo):
    path, _ = zoo.converted("shapes_cnn", **OPTIONS)
    return path


@pytest.fixture(scope="module")
def loaded(zoo, export):
    return zoo.loaded(export)


def png_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def explain_outputs(export_dir, paths, *, class_index=None) -> dict[str, np.ndarray]:
    """What `explain` computes for these files, in one batch: its tf.data pixels through the
    float signature (explainer.ExplainableModel.run)."""
    model = explainer.load_model(export_dir)
    batch = next(iter(images.dataset(paths, spec=model.spec, mode="unit", batch_size=len(paths))))
    assert list(batch["index"].numpy()) == list(range(len(paths)))
    return model.run(batch["pixels"].numpy(), class_index)


def encoded_variants(tmp_path: Path) -> list[str]:
    """testdata images re-encoded at other sizes, as PNG and JPEG (written as files for explain)."""
    paths = []
    for i, (source, size, kind) in enumerate([(IMAGES[0], (50, 70), "png"), (IMAGES[3], (17, 23), "jpg"),
                                              (IMAGES[5], (32, 32), "png"), (IMAGES[6], (90, 41), "jpg")]):
        pixels = tf.io.decode_png(tf.io.read_file(source))
        resized = tf.cast(tf.round(tf.image.resize(pixels, size)), tf.uint8)
        data = tf.io.encode_png(resized) if kind == "png" else tf.io.encode_jpeg(resized, quality=90)
        path = tmp_path / f"variant_{i}.{kind}"
        path.write_bytes(data.numpy())
        paths.append(str(path))
    return paths


def read_bytes(paths) -> tf.Tensor:
    return tf.constant([Path(p).read_bytes() for p in paths])


def test_bytes_signature_is_bit_equal_to_explain_on_the_testdata_images(export, loaded):
    got = loaded.signatures["serving_bytes"](image_bytes=read_bytes(IMAGES))
    want = explain_outputs(export, IMAGES)
    for key in ("output_0", "saliency", "explained_class"):
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)
    assert got["saliency"].dtype == tf.float32
    sizes = [png_size(Path(p).read_bytes()) for p in IMAGES]
    np.testing.assert_array_equal(got["image_size"].numpy(), sizes)
    assert got["image_size"].dtype == tf.int32


def test_mixed_sizes_and_formats_share_a_batch(export, loaded, tmp_path):
    paths = encoded_variants(tmp_path)
    got = loaded.signatures["serving_bytes"](image_bytes=read_bytes(paths))
    want = explain_outputs(export, paths)
    for key in ("output_0", "saliency", "explained_class"):
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)
    np.testing.assert_array_equal(got["image_size"].numpy(), [[50, 70], [17, 23], [32, 32], [90, 41]])


def test_explain_class_bytes_explains_the_given_class(export, loaded):
    classes = tf.constant([3, 0, 1, 2, 3, 0, 1, 2], tf.int64)
    got = loaded.signatures["explain_class_bytes"](image_bytes=read_bytes(IMAGES), class_index=classes)
    model = explainer.load_model(export)
    batch = next(iter(images.dataset(IMAGES, spec=model.spec, mode="unit", batch_size=len(IMAGES))))
    want = loaded.signatures["explain_class"](image=batch["pixels"], class_index=classes)
    for key in ("output_0", "saliency", "explained_class", "saliency_map", "saliency_png_bytes"):
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(), err_msg=key)
    np.testing.assert_array_equal(got["explained_class"].numpy(), classes.numpy())


@pytest.mark.parametrize("data, message", [
    (b"this is not an image", "Unknown image file format"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG"),  # a truncated PNG
])
def test_undecodable_bytes_fail_the_request_with_an_invalid_argument(loaded, data, message):
    good = Path(IMAGES[0]).read_bytes()
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([good, data]))


def test_uint8_map_is_255_times_the_float_map(loaded):
    out = loaded.signatures["serving_bytes"](image_bytes=read_bytes(IMAGES))
    saliency = out["saliency"].numpy().astype(np.float64)
    magnitude = np.abs(saliency).max(axis=-1)
    scaled = magnitude / magnitude.max(axis=(1, 2), keepdims=True)
    got = out["saliency_map"].numpy()
    assert got.dtype == np.uint8 and got.shape == saliency.shape[:3]
    assert np.max(np.abs(got.astype(int) - np.rint(scaled * 255))) <= 1  # float32 vs float64 rounding
    assert (got.max(axis=(1, 2)) == 255).all()


def test_saliency_png_is_the_heat_map_explain_writes(export, loaded, tmp_path):
    out = loaded.signatures["serving_bytes"](image_bytes=read_bytes(IMAGES))
    summary = gbp_rewrite.explain(export, IMAGES, out_dir=tmp_path)
    assert summary.explained == len(IMAGES)
    for i, path in enumerate(IMAGES):
        written = tf.io.decode_png(tf.io.read_file(str(tmp_path / f"{Path(path).stem}_heatmap.png"))).numpy()
        served = tf.io.decode_png(out["saliency_png_bytes"][i]).numpy()
        factor = written.shape[0] // served.shape[0]  # explain enlarges small pictures pixel for pixel
        assert factor >= 1 and written.shape == (served.shape[0] * factor, served.shape[1] * factor, 3)
        enlarged = np.repeat(np.repeat(served, factor, axis=0), factor, axis=1)
        np.testing.assert_array_equal(enlarged, written, err_msg=path)


def test_saliency_png_follows_numpy_percentile_heat(loaded):
    out = loaded.signatures["serving_bytes"](image_bytes=read_bytes(IMAGES))
    table = render.lookup_table("inferno")
    for saliency, png in zip(out["saliency"].numpy(), out["saliency_png_bytes"].numpy()):
        magnitude = np.abs(saliency.astype(np.float64)).max(axis=-1)
        white = np.percentile(magnitude, 99.5) or magnitude.max()
        heat = np.clip(magnitude / white, 0, 1).astype(np.float32).astype(np.float64)
        want = table[np.rint(heat * 4095).astype(int)]
        np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), want)


@pytest.mark.parametrize("count", [1, 2, 7, 200, 1024, 50176])
def test_graph_percentile_equals_numpy(count):
    rng = np.random.default_rng(count)
    values = rng.standard_exponential((3, count)) ** 3
    values[1, : count // 2] = 0.0  # ties and zeros
    got = serving_bytes._percentile(tf.constant(values), 99.5).numpy()
    np.testing.assert_array_equal(got, np.percentile(values, 99.5, axis=1))


def test_saliency_png_of_an_input_without_a_fixed_size():
    heat_png = tf.function(serving_bytes.heat_png,
                           input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    saliency = np.random.default_rng(5).normal(size=(2, 9, 13, 3)).astype(np.float32)
    for png, one in zip(heat_png(tf.constant(saliency)).numpy(), saliency):
        np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), render.colormap(render.saliency_heat(one)))


def test_all_zero_saliency_gives_a_black_png():
    png = serving_bytes.heat_png(tf.zeros([1, 4, 5, 3]))
    np.testing.assert_array_equal(tf.io.decode_png(png[0]).numpy(), render.colormap(np.zeros((4, 5))))


def test_report_records_the_serving_options(zoo, export):
    _, report = zoo.converted("shapes_cnn", **OPTIONS)
    assert report.serving["preprocess"] == "unit"
    assert report.serving["image_bytes_signatures"] == ["serving_bytes", "explain_class_bytes"]
    assert report.serving["saliency_map_dtype"] == "uint8" and report.serving["saliency_png"]
    assert "image_size" in report.signatures["serving_bytes"]
    assert "preprocess unit" in report.to_text()


def test_float_signatures_keep_their_input_and_gain_the_compact_outputs(loaded):
    serve = loaded.signatures["serving_default"]
    assert set(serve.structured_input_signature[1]) == {"image"}
    assert serve.structured_outputs["saliency_map"].dtype == tf.uint8
    assert serve.structured_outputs["saliency_png_bytes"].dtype == tf.string
    assert set(loaded.signatures["serving_bytes"].structured_input_signature[1]) == {"image_bytes"}


@pytest.mark.parametrize("mode", ["symmetric", "caffe"])
def test_preprocess_chosen_at_conversion_is_explains(zoo, mode):
    path, _ = zoo.converted("shapes_cnn", image_bytes=True, preprocess=mode)
    got = zoo.loaded(path).signatures["serving_bytes"](image_bytes=read_bytes(IMAGES[:3]))
    model = explainer.load_model(path)
    batch = next(iter(images.dataset(IMAGES[:3], spec=model.spec, mode=mode, batch_size=3)))
    want = model.run(batch["pixels"].numpy(), None)
    for key in ("output_0", "saliency"):
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)


def test_keras_path_writes_the_same_bytes_signature(zoo, tmp_path, export, loaded):
    report = gbp_rewrite.convert(REPO / "testdata" / "shapes_cnn.keras", tmp_path / "k", image_bytes=True)
    assert "serving_bytes" in report.signatures
    got = tf.saved_model.load(str(tmp_path / "k")).signatures["serving_bytes"](image_bytes=read_bytes(IMAGES[:2]))
    want = loaded.signatures["serving_bytes"](image_bytes=read_bytes(IMAGES[:2]))
    np.testing.assert_allclose(got["saliency"].numpy(), want["saliency"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["image_size"].numpy(), want["image_size"].numpy())


def test_bad_options_are_one_line_errors_before_anything_is_written(zoo, tmp_path):
    destination = tmp_path / "never"
    with pytest.raises(OptionError, match="saliency_map_dtype 'int8'.*float32, uint8"):
        gbp_rewrite.convert(zoo.model("shapes_cnn"), destination, saliency_map_dtype="int8")
    with pytest.raises(OptionError, match="preprocessing 'imagenet'"):
        gbp_rewrite.convert(zoo.model("shapes_cnn"), destination, image_bytes=True, preprocess="imagenet")
    with pytest.raises(SignatureError, match="one image input"):
        gbp_rewrite.convert(zoo.model("multi_io"), destination, image_bytes=True, output="cls")
    assert not destination.exists()


def test_non_image_input_is_refused(zoo, tmp_path):
    with pytest.raises(GbpError, match="image_bytes_signature|image inputs"):
        gbp_rewrite.convert(zoo.model("relu6_hand"), tmp_path / "x", image_bytes=True)
    assert not (tmp_path / "x").exists()


def test_verify_runs_the_bytes_signatures_in_python_and_cpp(export, serving_check_binary):
    report = gbp_rewrite.verify_export(export, source=REPO / "testdata" / "shapes_cnn",
                                       serving_check=serving_check_binary)
    assert report.ok, report.to_text()
    for key in ("serving_bytes", "explain_class_bytes"):
        assert report.check(f"runs: {key}").status == "pass"
        assert report.check(f"C++ loader (LoadSavedModel + Session::Run): {key}").status == "pass"
    assert report.check("consistency: explain_class_bytes vs serving_bytes").status == "pass"
    assert "DecodeImage" in report.op_types and "EncodePng" in report.op_types
    assert not any("PyFunc" in op for op in report.op_types)


def test_the_clean_check_uses_the_names_the_converter_writes(export, loaded):
    """The clean process (no gbp_rewrite imported) looks for the bytes input, the class signatures
    and the warm-up file by name: each must be what a real export holds."""
    from gbp_rewrite.deploy import clean_process

    assert set(loaded.signatures["serving_bytes"].structured_input_signature[1]) == {clean_process.IMAGE_BYTES}
    for class_key, source_key in clean_process.CLASS_SIGNATURES.items():
        assert class_key in loaded.signatures and (source_key is None or source_key in loaded.signatures)
    assert (Path(export) / clean_process.WARMUP_FILE).is_file()
