"""Tests for gbp_rewrite.pictures.render (saliency pictures as PNG)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

from gbp_rewrite.pictures import render
from gbp_rewrite.errors import GbpError, RenderError


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luma of uint8 RGB colours, shape [..., 3] -> [...]."""
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def _decode(path) -> np.ndarray:
    return tf.io.decode_png(tf.io.read_file(str(path))).numpy()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- heat


def test_heat_square_is_one_inside_zero_outside():
    sal = np.zeros((32, 32, 3), np.float32)
    sal[8:16, 10:18, 1] = -3.0  # sign must not matter
    sal[8:16, 10:18, 0] = 1.0   # channel max of |.| is taken
    heat = render.saliency_heat(sal)
    assert heat.shape == (32, 32) and heat.dtype == np.float32
    inside = np.zeros((32, 32), bool)
    inside[8:16, 10:18] = True
    np.testing.assert_array_equal(heat[inside], 1.0)
    np.testing.assert_array_equal(heat[~inside], 0.0)


def test_heat_accepts_2d_and_integers():
    sal = np.zeros((5, 6), np.int32)
    sal[1, 2] = -7
    heat = render.saliency_heat(sal)
    assert heat.shape == (5, 6)
    assert heat[1, 2] == 1.0 and heat.sum() == 1.0


def test_heat_all_zero_gives_zeros_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        heat = render.saliency_heat(np.zeros((7, 9, 3), np.float32))
    assert heat.shape == (7, 9)
    assert not np.isnan(heat).any()
    np.testing.assert_array_equal(heat, 0.0)


def test_heat_percentile_saturates_outliers(rng):
    sal = rng.uniform(0.5, 1.0, size=(40, 40, 3))
    sal[0, 0, 0] = 1e6  # a single extreme pixel
    clipped = render.saliency_heat(sal)
    plain = render.saliency_heat(sal, clip_percentile=100)
    assert clipped[0, 0] == 1.0
    assert np.median(clipped) > 0.5       # structure stays visible
    assert np.median(plain) < 1e-5        # without clipping: all black
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0


@pytest.mark.parametrize("bad", [0, -1, 100.5, float("nan")])
def test_heat_rejects_bad_percentile(bad):
    with pytest.raises(RenderError, match="clip_percentile"):
        render.saliency_heat(np.ones((4, 4)), clip_percentile=bad)


# ---------------------------------------------------------------- colormap


@pytest.mark.parametrize("name", render.COLORMAP_NAMES)
def test_colormap_endpoints(name):
    stops = render._COLORMAPS[name]
    rgb = render.colormap(np.array([[0.0, 1.0]]), name=name)
    assert rgb.shape == (1, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], stops[0])
    np.testing.assert_array_equal(rgb[0, 1], stops[-1])


def test_inferno_endpoints_match_matplotlib():
    rgb = render.colormap(np.array([[0.0, 1.0]]), name="inferno")
    np.testing.assert_array_equal(rgb[0, 0], [0, 0, 4])        # #000004
    np.testing.assert_array_equal(rgb[0, 1], [252, 255, 164])  # #fcffa4


@pytest.mark.parametrize("name", ["inferno", "gray", "viridis"])
def test_colormap_luminance_increases(name):
    ramp = np.linspace(0.0, 1.0, 256)[np.newaxis, :]
    luma = _luminance(render.colormap(ramp, name=name)[0])
    assert np.all(np.diff(luma) >= -0.5)  # uint8 rounding only
    coarse = _luminance(render.colormap(
        np.linspace(0.0, 1.0, 17)[np.newaxis, :], name=name)[0])
    assert np.all(np.diff(coarse) > 0)


def test_colormap_clips_out_of_range():
    rgb = render.colormap(np.array([[-0.5, 1.5]]), name="gray")
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 255])


def test_colormap_unknown_name_lists_valid_names():
    with pytest.raises(RenderError) as err:
        render.colormap(np.zeros((2, 2)), name="jet")
    for valid in render.COLORMAP_NAMES:
        assert valid in str(err.value)
    assert "'jet'" in str(err.value)


# ---------------------------------------------------------------- overlay


def test_overlay_alpha_extremes_same_size(rng):
    image = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    heat = rng.uniform(size=(12, 10))
    heat[:3] = 0.0
    heat[-3:] = 1.0
    np.testing.assert_array_equal(render.overlay(image, heat, alpha=0.0), image)
    full = render.overlay(image, heat, alpha=1.0)
    # blended by the heat: the photo where it is 0, the colour where it is 1
    np.testing.assert_array_equal(full[:3], image[:3])
    np.testing.assert_array_equal(full[-3:], render.colormap(heat[-3:]))
    colour = render.colormap(heat).astype(np.float64)
    expected = image + heat[:, :, None] * (colour - image)
    assert np.max(np.abs(full - expected)) <= 0.5 + 1e-9


def test_overlay_does_not_darken_where_the_heat_is_zero():
    image = np.full((4, 4, 3), 200, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = render.overlay(image, heat, alpha=0.5, colormap_name="gray")
    np.testing.assert_array_equal(out[1:], 200)  # zero heat: the photo, not half black
    np.testing.assert_array_equal(out[0, 0], 228)  # 200 + 0.5 * (255 - 200) = 227.5, rounded


def test_overlay_enlarges_heat_by_whole_factors_without_blur(rng):
    image = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    heat = (rng.uniform(size=(16, 12)) > 0.5).astype(np.float64)
    out = render.overlay(image, heat, alpha=1.0, colormap_name="gray")
    big = np.kron(heat, np.ones((4, 4)))  # each heat pixel covers 4 x 4 image pixels
    np.testing.assert_array_equal(out[big == 0], image[big == 0])
    np.testing.assert_array_equal(out[big == 1], 255)


@pytest.mark.parametrize("sign, expected", [("abs", [1.0, 0.5, 0.0]), ("positive", [1.0, 0.0, 0.0]),
                                            ("negative", [0.0, 1.0, 0.0])])
def test_heat_sign_modes(sign, expected):
    sal = np.array([[[2.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # [1, 3, 3]
    heat = render.saliency_heat(sal, clip_percentile=100, sign=sign)
    np.testing.assert_allclose(heat[0], expected)
    with pytest.raises(RenderError, match="unknown sign mode 'both'.*abs, positive, negative"):
        render.saliency_heat(sal, sign="both")


@pytest.mark.parametrize("alpha", [-0.1, 1.1])
def test_overlay_rejects_bad_alpha(alpha):
    with pytest.raises(RenderError, match="alpha"):
        render.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4)),
                       alpha=alpha)


# ---------------------------------------------------------------- guided


@pytest.mark.parametrize("channels", [1, 3])
def test_guided_constant_gradient_is_grey(channels):
    sal = np.full((9, 11, channels), 0.37, np.float32)
    out = render.guided_image(sal)
    assert out.shape == (9, 11, channels) and out.dtype == np.uint8
    assert np.all(np.abs(out.astype(int) - 128) <= 1)


def test_guided_zero_gradient_is_grey():
    out = render.guided_image(np.zeros((5, 5, 3)))
    assert np.all(np.abs(out.astype(int) - 128) <= 1)


def test_guided_tiny_gradients_keep_contrast(rng):
    sal = rng.normal(size=(32, 32, 3)) * 1e-9
    out = render.guided_image(sal).astype(np.float64)
    # mean ~ 127.5, std ~ 0.1 * 255 (a few values clip)
    assert abs(out.mean() - 127.5) < 3
    assert 20 < out.std() < 30


def test_guided_2d_becomes_one_channel(rng):
    out = render.guided_image(rng.normal(size=(6, 7)))
    assert out.shape == (6, 7, 1)


# ---------------------------------------------------------------- PNG


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_encode_png_roundtrip(rng, shape):
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    data = render.encode_png(array)
    assert isinstance(data, bytes) and data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = tf.io.decode_png(data).numpy()
    np.testing.assert_array_equal(decoded.reshape(shape), array)


def test_write_png_atomic_and_overwrites(tmp_path, rng):
    path = tmp_path / "sub" / "a.png"
    first = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    second = rng.integers(0, 256, size=(6, 2, 1), dtype=np.uint8)
    assert render.write_png(path, first) == path
    render.write_png(str(path), second)
    np.testing.assert_array_equal(_decode(path), second)
    assert sorted(os.listdir(path.parent)) == ["a.png"]  # no temp files left


def test_render_all_writes_readable_pictures_and_a_figure(tmp_path, rng):
    image = rng.integers(0, 256, size=(96, 80, 3), dtype=np.uint8)
    sal = rng.normal(size=(32, 32, 3)).astype(np.float32)
    paths = render.render_all(image, sal, out_dir=tmp_path / "out", stem="cat", caption="cat 0.5")
    assert set(paths) == {"figure", "heatmap", "overlay", "guided"}
    assert sorted(os.listdir(tmp_path / "out")) == [
        "cat_figure.png", "cat_guided.png", "cat_heatmap.png", "cat_overlay.png"]
    # short side 80 < 224: every picture is the image enlarged 3 times (240 px)
    for kind in ("heatmap", "overlay", "guided"):
        assert _decode(paths[kind]).shape == (288, 240, 3), kind
    overlay = _decode(paths["overlay"])
    heat = np.clip(render.resize_to(render.saliency_heat(sal), 288, 240), 0, 1)
    np.testing.assert_array_equal(_decode(paths["heatmap"]), render.colormap(heat))
    photo = np.kron(image, np.ones((3, 3, 1), np.uint8))  # nearest neighbour, by hand
    np.testing.assert_array_equal(overlay, render.overlay(photo, heat))
    figure = _decode(paths["figure"])
    assert figure.shape[1] > 3 * 240 and figure.shape[0] > 288
    # the three panels are in the figure, pixel for pixel, side by side on one row
    top = next(r for r in range(figure.shape[0]) if
               any(np.array_equal(figure[r, c:c + 240], photo[0]) for c in range(0, 40)))
    row = figure[top:top + 288]
    for panel in (photo, overlay, np.repeat(_decode(paths["guided"])[:, :, :1], 3, 2)
                  if _decode(paths["guided"]).shape[2] == 1 else _decode(paths["guided"])):
        assert any(np.array_equal(row[:, c:c + 240], panel) for c in range(row.shape[1] - 239))


def test_render_all_greyscale_saliency(tmp_path, rng):
    image = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    sal = rng.normal(size=(28, 28, 1))
    paths = render.render_all(image, sal, out_dir=tmp_path, stem="digit",
                              colormap_name="gray", alpha=0.3)
    # 28 px: enlarged 8 times to 224, each saliency pixel an 8 x 8 block
    guided = _decode(paths["guided"])
    assert guided.shape == (224, 224, 1)
    np.testing.assert_array_equal(guided, np.kron(render.guided_image(sal), np.ones((8, 8, 1), np.uint8)))
    heat = np.kron(render.saliency_heat(sal), np.ones((8, 8)))
    np.testing.assert_array_equal(_decode(paths["heatmap"]), render.colormap(heat, name="gray"))


def test_render_all_without_image_writes_no_overlay(tmp_path, rng):
    sal = rng.normal(size=(16, 12, 3))
    paths = render.render_all(None, sal, out_dir=tmp_path, stem="x", clip_percentile=90)
    assert sorted(paths) == ["guided", "heatmap"]
    assert sorted(os.listdir(tmp_path)) == ["x_guided.png", "x_heatmap.png"]
    heat = np.kron(render.saliency_heat(sal, clip_percentile=90), np.ones((19, 19)))  # 12 * 19 >= 224
    np.testing.assert_array_equal(_decode(paths["heatmap"]), render.colormap(heat))


@pytest.mark.parametrize("image", [None, np.zeros((8, 8, 3), np.uint8)])
def test_render_all_needs_a_guided_picture_with_or_without_image(tmp_path, image):
    """One rule: the guided picture takes 1 or 3 channels, whether or not an overlay is made."""
    with pytest.raises(RenderError, match=r"\[H, W, 1\] or \[H, W, 3\]"):
        render.render_all(image, np.ones((8, 8, 2)), out_dir=tmp_path / "out", stem="x")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("call, match", [
    (lambda: render.saliency_heat(np.zeros((1, 8, 8, 3))),
     r"\[H, W\] or \[H, W, C\].*\(1, 8, 8, 3\).*batch axis"),
    (lambda: render.saliency_heat(np.zeros(8)), r"\(8,\)"),
    (lambda: render.saliency_heat(np.zeros((0, 8, 3))), r"empty"),
    (lambda: render.saliency_heat(np.array([[np.nan, 1.0]])), r"non-finite"),
    (lambda: render.saliency_heat(np.zeros((4, 4), bool)), r"dtype bool"),
    (lambda: render.colormap(np.zeros((4, 4, 1))), r"heat.*\[H, W\].*\(4, 4, 1\)"),
    (lambda: render.overlay(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8))),
     r"uint8.*\[H, W, 3\].*float32"),
    (lambda: render.overlay(np.zeros((8, 8), np.uint8), np.zeros((8, 8))),
     r"\[H, W, 3\].*\(8, 8\)"),
    (lambda: render.guided_image(np.zeros((8, 8, 2))),
     r"\[H, W, 1\] or \[H, W, 3\].*\(8, 8, 2\)"),
    (lambda: render.encode_png(np.zeros((4, 4, 3), np.float32)),
     r"uint8.*float32"),
    (lambda: render.encode_png(np.zeros((4, 4, 5), np.uint8)), r"\(4, 4, 5\)"),
    (lambda: render.render_all(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)),
                               out_dir=".", stem="a/b"), r"stem"),
    (lambda: render.render_all(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)),
                               out_dir=".", stem="a", colormap_name="jet"),
     r"inferno"),
])
def test_bad_inputs_raise_helpful_render_error(call, match):
    with pytest.raises(RenderError, match=match):
        call()


def test_failed_render_all_writes_nothing(tmp_path):
    with pytest.raises(RenderError):
        render.render_all(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 2)),
                          out_dir=tmp_path / "out", stem="x")
    assert not (tmp_path / "out").exists()


def test_render_error_is_a_gbp_error():
    assert issubclass(RenderError, GbpError)


def test_heat_sparse_saliency_falls_back_to_max():
    # One non-zero pixel in 4096: the 99.5th percentile is 0.
    sal = np.zeros((64, 64, 3))
    sal[10, 20, 2] = 0.25
    heat = render.saliency_heat(sal)
    assert heat[10, 20] == 1.0 and heat.sum() == 1.0
