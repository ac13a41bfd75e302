"""Render guided-backpropagation saliency maps as PNG pictures.

Everything here takes numpy arrays and returns numpy arrays or bytes; the
only TensorFlow used is ``tf.image.resize`` (to fit a heat map onto a
differently sized image) and ``tf.io.encode_png``, so no plotting or imaging
library is needed.

Typical use::

    paths = render_all(image_uint8, saliency, out_dir="out", stem="cat")
    # {"heatmap": .../cat_heatmap.png, "overlay": .../cat_overlay.png,
    #  "guided": .../cat_guided.png}

Bad arguments raise :class:`gbp_rewrite.errors.RenderError` (a ``GbpError``).

Shapes never carry a batch axis: images are ``[H, W, 3]`` uint8, saliency
(the gradient of a class score with respect to the model input) is
``[H, W, C]`` or ``[H, W]``.
"""

from __future__ import annotations

import logging
import os
import pathlib
import secrets
from typing import Mapping, NoReturn

import numpy as np
import tensorflow as tf

from gbp_rewrite.errors import RenderError
from gbp_rewrite.pictures import font

__all__ = [
    "COLORMAP_NAMES",
    "SIGNS",
    "display_scale",
    "resize_to",
    "figure",
    "saliency_heat",
    "colormap",
    "lookup_table",
    "overlay",
    "guided_image",
    "encode_png",
    "write_png",
    "render_pictures",
    "check_options",
    "render_all",
]

logger = logging.getLogger(__name__)


def _hex_stops(*hex_colours: str) -> np.ndarray:
    """Turn ``"#rrggbb"`` strings into a float64 ``[N, 3]`` table in [0, 255]."""
    return np.array(
        [[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in hex_colours],
        dtype=np.float64,
    )


# Colormaps as evenly spaced stops, interpolated linearly in between.  The
# inferno and viridis stops are matplotlib's maps sampled at 0, 1/9, ..., 1;
# ten stops keep the piecewise-linear approximation within a few levels of
# the 256-entry original and preserve its monotonically increasing luminance.
_COLORMAPS: Mapping[str, np.ndarray] = {
    "inferno": _hex_stops(
        "#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60",
        "#cf4446", "#ed6925", "#fb9b06", "#f7d13d", "#fcffa4",
    ),
    "viridis": _hex_stops(
        "#440154", "#482878", "#3e4989", "#31688e", "#26828e",
        "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725",
    ),
    "gray": _hex_stops("#000000", "#ffffff"),
}

#: Names accepted by :func:`colormap` (and ``colormap_name`` of :func:`render_all`).
COLORMAP_NAMES: tuple[str, ...] = tuple(sorted(_COLORMAPS))

#: Sign modes of :func:`saliency_heat` (captum's visualisation names them the same way).
SIGNS: tuple[str, ...] = ("abs", "positive", "negative")

#: Pictures narrower than this on their short side are enlarged by a whole factor to be readable.
MIN_SHORT_SIDE = 224

# Entries of a colour lookup table: heat steps of 1/4095 move a colour by
# well under one uint8 level, so indexing matches interpolating per pixel.
_TABLE_SIZE = 4096


def _lookup_table(stops: np.ndarray) -> np.ndarray:
    """The ``[_TABLE_SIZE, 3]`` uint8 colours of evenly spaced heats in [0, 1]."""
    heats = np.linspace(0.0, 1.0, _TABLE_SIZE)
    positions = np.linspace(0.0, 1.0, len(stops))
    rgb = np.stack(
        [np.interp(heats, positions, stops[:, c]) for c in range(3)], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# Built once at import: colouring a picture is then one indexing operation.
_LOOKUP_TABLES: Mapping[str, np.ndarray] = {
    name: _lookup_table(stops) for name, stops in _COLORMAPS.items()}


def lookup_table(name: str = "inferno") -> np.ndarray:
    """The colormap's ``[4096, 3]`` uint8 table: :func:`colormap` colours heat ``h`` with entry
    ``rint(h * 4095)``. For code that colours heat maps elsewhere (the serving graph's PNGs)."""
    if name not in _LOOKUP_TABLES:
        _fail(f"unknown colormap {name!r}; valid names are {', '.join(COLORMAP_NAMES)}")
    return _LOOKUP_TABLES[name].copy()


# Formats the PNG encoder accepts: grey, grey+alpha, RGB, RGBA.
_PNG_CHANNELS = (1, 2, 3, 4)


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _fail(msg: str) -> NoReturn:
    """Raise the module's error type (the single place to change it)."""
    raise RenderError(msg)


def _describe(array: np.ndarray) -> str:
    """``shape (…) and dtype …`` for error messages."""
    return f"shape {tuple(array.shape)} and dtype {array.dtype}"


def _check_spatial(array: np.ndarray, what: str) -> None:
    """Fail if the first two (spatial) dimensions are empty."""
    if array.shape[0] == 0 or array.shape[1] == 0:
        _fail(f"{what} has an empty spatial size: got {_describe(array)}; "
              "height and width must both be at least 1")


def _as_real(array, what: str, expected: str) -> np.ndarray:
    """Return ``array`` as a finite real numpy array or fail."""
    array = np.asarray(array)
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer)
        or np.issubdtype(array.dtype, np.floating)
    ):
        _fail(f"{what} must be a real-valued (integer or float) array of "
              f"shape {expected}; got {_describe(array)}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        _fail(f"{what} contains {bad} non-finite value(s) (NaN or inf) in "
              f"an array of {_describe(array)}; expected finite values")
    return array


def _check_saliency(saliency, what: str = "saliency") -> np.ndarray:
    """Validate a ``[H, W]`` or ``[H, W, C]`` gradient and return it."""
    expected = "[H, W] or [H, W, C]"
    saliency = _as_real(saliency, what, expected)
    if saliency.ndim not in (2, 3):
        hint = (" (drop the batch axis first, e.g. saliency[0])"
                if saliency.ndim == 4 else "")
        _fail(f"{what} must have shape {expected}; got {_describe(saliency)}"
              f"{hint}")
    if saliency.ndim == 3 and saliency.shape[2] == 0:
        _fail(f"{what} has no channels: got {_describe(saliency)}; "
              f"expected shape {expected} with C >= 1")
    _check_spatial(saliency, what)
    return saliency


def _check_image(image) -> np.ndarray:
    """Validate an ``[H, W, 3]`` uint8 RGB image and return it."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        hint = (" (drop the batch axis first, e.g. image[0])"
                if image.ndim == 4 else "")
        _fail(f"image must be an RGB uint8 array of shape [H, W, 3]; got "
              f"{_describe(image)}{hint}")
    _check_spatial(image, "image")
    return image


def _check_heat(heat) -> np.ndarray:
    """Validate a ``[H, W]`` heat map and return it as float64 in [0, 1]."""
    heat = _as_real(heat, "heat", "[H, W]")
    if heat.ndim != 2:
        _fail(f"heat must have shape [H, W] (see saliency_heat); got "
              f"{_describe(heat)}")
    _check_spatial(heat, "heat")
    # Values are documented to be in [0, 1]; clip so resampling overshoot or
    # float rounding cannot index outside the colour table.
    return np.clip(heat.astype(np.float64), 0.0, 1.0)


def _check_alpha(alpha: float) -> float:
    """Validate a blending weight in [0, 1]."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        _fail(f"alpha must be in [0, 1]; got {alpha}")
    return alpha


# --------------------------------------------------------------------------
# Array transforms
# --------------------------------------------------------------------------


def saliency_heat(saliency: np.ndarray, *,
                  clip_percentile: float = 99.5, sign: str = "abs") -> np.ndarray:
    """Collapse a gradient into a ``[H, W]`` float32 heat map in [0, 1].

    The heat of a pixel is the largest gradient value over its channels
    after the ``sign`` mode (as captum's visualisation offers): ``abs`` takes
    ``|g|``, ``positive`` only ``max(g, 0)`` (what raises the score),
    ``negative`` only ``max(-g, 0)`` (what lowers it).  It is divided by a
    robust maximum: the ``clip_percentile``-th percentile of all pixel heats
    (values above it saturate at 1).  ``clip_percentile=100`` divides by the
    plain maximum.  An all-zero gradient gives all zeros.

    Args:
      saliency: ``[H, W, C]`` or ``[H, W]`` gradient (any real dtype).
      clip_percentile: percentile in (0, 100] used as the white point.
      sign: one of :data:`SIGNS`.
    """
    saliency = _check_saliency(saliency)
    clip_percentile = float(clip_percentile)
    if not 0.0 < clip_percentile <= 100.0:
        _fail(f"clip_percentile must be in (0, 100]; got {clip_percentile}")
    if sign not in SIGNS:
        _fail(f"unknown sign mode {sign!r}; valid modes are {', '.join(SIGNS)}")

    values = saliency.astype(np.float64)
    magnitude = (np.abs(values) if sign == "abs" else
                 np.maximum(values, 0.0) if sign == "positive" else np.maximum(-values, 0.0))
    if magnitude.ndim == 3:
        magnitude = magnitude.max(axis=2)
    peak = float(magnitude.max())
    if peak == 0.0:
        return np.zeros(magnitude.shape, dtype=np.float32)

    # Guided-backprop gradients are heavy-tailed: a handful of pixels (often
    # on a sharp edge) can be orders of magnitude larger than the rest, so
    # dividing by the true maximum renders nearly the whole map black.  Using
    # a high percentile as the white point lets those few pixels saturate and
    # keeps the structure of everything else visible.
    white = float(np.percentile(magnitude, clip_percentile))
    if white <= 0.0:
        # Very sparse gradient (more than 100 - clip_percentile % of pixels
        # are zero): the percentile is 0, so fall back to the true maximum.
        white = peak
    return np.clip(magnitude / white, 0.0, 1.0).astype(np.float32)


def colormap(heat: np.ndarray, *, name: str = "inferno") -> np.ndarray:
    """Colour a ``[H, W]`` heat map in [0, 1] into a ``[H, W, 3]`` uint8 image.

    0 maps to the colormap's first colour and 1 to its last; values outside
    [0, 1] are clipped.  ``name`` is one of :data:`COLORMAP_NAMES`.
    """
    if name not in _COLORMAPS:
        _fail(f"unknown colormap {name!r}; valid names are "
              f"{', '.join(COLORMAP_NAMES)}")
    heat = _check_heat(heat)
    index = np.rint(heat * (_TABLE_SIZE - 1)).astype(np.intp)
    return _LOOKUP_TABLES[name][index]


def display_scale(height: int, width: int) -> int:
    """The whole factor that brings the short side to at least MIN_SHORT_SIDE pixels (1 if it is)."""
    short = max(1, min(height, width))
    return max(1, -(-MIN_SHORT_SIDE // short))


def resize_to(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``[h, w]`` or ``[h, w, C]`` to ``[height, width]`` (float64).

    Whole-number enlargements repeat pixels (nearest neighbour), so the
    saliency's own pixels stay visible and sharp; other sizes resample
    bilinearly with antialiasing.
    """
    array = np.asarray(array, dtype=np.float64)
    h, w = array.shape[:2]
    if (h, w) == (height, width):
        return array
    if height % h == 0 and width % w == 0:
        return np.repeat(np.repeat(array, height // h, axis=0), width // w, axis=1)
    flat = array.ndim == 2
    resized = tf.image.resize((array[:, :, np.newaxis] if flat else array).astype(np.float32),
                              (height, width), method="bilinear", antialias=True).numpy()
    return (resized[:, :, 0] if flat else resized).astype(np.float64)


def overlay(image_uint8: np.ndarray, heat: np.ndarray, *,
            alpha: float = 0.5, colormap_name: str = "inferno") -> np.ndarray:
    """Blend the colour-mapped heat over an RGB image, by the heat.

    The heat map is resized to the image size when the two differ (see
    :func:`resize_to`), coloured with :func:`colormap`, and mixed per pixel as
    ``image + alpha * heat * (colour - image)``: where the heat is zero the
    photo is untouched (not darkened by the colormap's dark end), and at
    full heat the colour has weight ``alpha``.

    Args:
      image_uint8: ``[H, W, 3]`` uint8 RGB image.
      heat: ``[h, w]`` heat map in [0, 1] (see :func:`saliency_heat`).
      alpha: weight of the heat colours at full heat, in [0, 1].
      colormap_name: one of :data:`COLORMAP_NAMES`.
    Returns:
      ``[H, W, 3]`` uint8.
    """
    image = _check_image(image_uint8)
    alpha = _check_alpha(alpha)
    heat = _check_heat(heat)
    heat = np.clip(resize_to(heat, image.shape[0], image.shape[1]), 0.0, 1.0)
    colour = colormap(heat, name=colormap_name).astype(np.float32)
    weight = (np.float32(alpha) * heat.astype(np.float32))[:, :, np.newaxis]
    photo = image.astype(np.float32)
    blended = photo + weight * (colour - photo)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def guided_image(saliency: np.ndarray, *, std_scale: float = 0.1) -> np.ndarray:
    """The guided-backpropagation picture, as shown in the paper's figures.

    The gradient is standardised over the whole array (all pixels and
    channels), scaled to ``std_scale`` standard deviation around mid-grey and
    clipped: ``x = clip((g - mean) / std * std_scale + 0.5, 0, 1) * 255``.
    A constant gradient therefore renders as uniform grey (128).

    Args:
      saliency: ``[H, W, C]`` gradient with C = 1 (grey) or 3 (RGB); a 2-D
        ``[H, W]`` gradient is treated as C = 1.
      std_scale: output standard deviation as a fraction of the full range.
    Returns:
      ``[H, W, C]`` uint8 (grey input stays one channel).
    """
    saliency = _check_saliency(saliency)
    if saliency.ndim == 2:
        saliency = saliency[:, :, np.newaxis]
    if saliency.shape[2] not in (1, 3):
        _fail(f"saliency for guided_image must have shape [H, W, 1] or "
              f"[H, W, 3]; got {_describe(saliency)}")
    std_scale = float(std_scale)
    if not std_scale > 0.0:
        _fail(f"std_scale must be positive; got {std_scale}")

    grad = saliency.astype(np.float64)
    centred = grad - grad.mean()
    std = float(centred.std())
    # Gradients can legitimately be tiny (1e-8), so no fixed epsilon: treat
    # the spread as zero only relative to the gradient's own magnitude, which
    # also absorbs the rounding noise left by subtracting the mean.
    scale = float(np.abs(grad).max())
    if std <= 1e-7 * scale or std == 0.0:
        unit = np.full(grad.shape, 0.5)
    else:
        unit = np.clip(centred / std * std_scale + 0.5, 0.0, 1.0)
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# PNG output
# --------------------------------------------------------------------------


def encode_png(array_uint8: np.ndarray) -> bytes:
    """Encode a ``[H, W]`` or ``[H, W, C]`` (C in 1..4) uint8 array as PNG."""
    array = np.asarray(array_uint8)
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if (array.dtype != np.uint8 or array.ndim != 3
            or array.shape[2] not in _PNG_CHANNELS):
        _fail(f"PNG data must be a uint8 array of shape [H, W] or [H, W, C] "
              f"with C in {_PNG_CHANNELS}; got {_describe(np.asarray(array_uint8))}")
    _check_spatial(array, "PNG data")
    return tf.io.encode_png(array).numpy()


def write_png(path: str | os.PathLike, array_uint8: np.ndarray) -> pathlib.Path:
    """Encode ``array_uint8`` as PNG and write it to ``path`` atomically.

    The bytes go to a temporary file in the destination directory, which is
    then renamed over ``path`` (``os.replace``), so readers never see a
    half-written picture.  Local paths only.  Missing parent directories are
    created.  Returns ``path`` as a :class:`pathlib.Path`.
    """
    data = encode_png(array_uint8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name (rather than mkstemp) lets the file get the usual
    # umask-derived permissions instead of mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("wrote %s (%d bytes, shape %s)", path, len(data),
                 tuple(np.shape(array_uint8)))
    return path


def _enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    """Repeat every pixel factor x factor times (nearest neighbour: no blur on small inputs)."""
    return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _rgb(picture: np.ndarray) -> np.ndarray:
    return picture if picture.shape[2] == 3 else np.repeat(picture, 3, axis=2)


_PAPER, _INK = 255, 0


def _text_block(text: str, width: int, scale: int) -> np.ndarray:
    """The text, dark on white, left-aligned in a [7 * scale, width, 3] strip (cut if too long)."""
    mask = font.text_image(text, scale=scale)[:, :width]
    strip = np.full((mask.shape[0], width, 3), _PAPER, np.uint8)
    strip[:, :mask.shape[1]][mask > 0] = _INK
    return strip


def figure(panels: Mapping[str, np.ndarray], caption: str) -> np.ndarray:
    """One picture of equally sized ``[H, W, 3]`` uint8 panels side by side, each titled, under a
    caption line (the class and score), on white; text in the embedded bitmap font."""
    titled = list(panels.items())
    height, width = titled[0][1].shape[:2]
    scale = max(3, min(height, width) // 64)  # 5x7 glyphs at 3x on 224 px panels, larger on larger
    gap = 4 * scale
    total_width = len(titled) * width + (len(titled) + 1) * gap
    rows = [np.full((gap, total_width, 3), _PAPER, np.uint8),
            np.pad(_text_block(caption, total_width - 2 * gap, scale), ((0, 0), (gap, gap), (0, 0)),
                   constant_values=_PAPER),
            np.full((gap, total_width, 3), _PAPER, np.uint8)]
    titles, pictures = [], []
    for title, picture in titled:
        titles.append(_text_block(title, width, max(1, scale - 1) if scale > 2 else scale))
        pictures.append(picture)
    title_height = max(t.shape[0] for t in titles)
    spacer = np.full((title_height, gap, 3), _PAPER, np.uint8)
    title_row = [spacer]
    for t in titles:
        title_row += [np.pad(t, ((0, title_height - t.shape[0]), (0, 0), (0, 0)), constant_values=_PAPER), spacer]
    rows.append(np.concatenate(title_row, axis=1))
    rows.append(np.full((gap // 2, total_width, 3), _PAPER, np.uint8))
    column = np.full((height, gap, 3), _PAPER, np.uint8)
    picture_row = [column]
    for picture in pictures:
        picture_row += [picture, column]
    rows.append(np.concatenate(picture_row, axis=1))
    rows.append(np.full((gap, total_width, 3), _PAPER, np.uint8))
    return np.concatenate(rows, axis=0)


def check_options(*, colormap_name: str, alpha: float, clip_percentile: float, sign: str) -> None:
    """Refuse drawing options before any work (render_all checks them again per picture)."""
    if colormap_name not in _COLORMAPS:
        _fail(f"unknown colormap {colormap_name!r}; valid names are {', '.join(COLORMAP_NAMES)}")
    _check_alpha(alpha)
    if not 0.0 < float(clip_percentile) <= 100.0:
        _fail(f"clip_percentile must be in (0, 100]; got {clip_percentile}")
    if sign not in SIGNS:
        _fail(f"unknown sign mode {sign!r}; valid modes are {', '.join(SIGNS)}")


def render_pictures(image_uint8: np.ndarray | None, saliency: np.ndarray, *,
                    colormap_name: str = "inferno", alpha: float = 0.5,
                    clip_percentile: float = 99.5, sign: str = "abs",
                    caption: str = "") -> dict[str, np.ndarray]:
    """The pictures :func:`render_all` writes, as uint8 arrays by kind.

    ``{"overlay", "figure", "heatmap", "guided"}`` (no ``"overlay"`` and
    ``"figure"`` without an image); the arguments are those of
    :func:`render_all`, ``caption`` the figure's text.
    """
    image = None if image_uint8 is None else _check_image(image_uint8)
    alpha = _check_alpha(alpha)
    saliency = _check_saliency(saliency)
    check_options(colormap_name=colormap_name, alpha=alpha, clip_percentile=clip_percentile, sign=sign)
    base_h, base_w = (image if image is not None else saliency).shape[:2]
    factor = display_scale(base_h, base_w)
    height, width = base_h * factor, base_w * factor
    heat = resize_to(saliency_heat(saliency, clip_percentile=clip_percentile, sign=sign), height, width)
    heat = np.clip(heat, 0.0, 1.0)
    guided = guided_image(saliency)
    guided = np.clip(np.rint(resize_to(guided, height, width)), 0, 255).astype(np.uint8)
    pictures = {}
    if image is not None:
        photo = _enlarge(image, factor)
        pictures["overlay"] = overlay(photo, heat, alpha=alpha, colormap_name=colormap_name)
        pictures["figure"] = figure({"image": photo, "overlay": pictures["overlay"],
                                     "guided backprop": _rgb(guided)}, caption)
    pictures["heatmap"] = colormap(heat, name=colormap_name)
    pictures["guided"] = guided
    return pictures


def render_all(image_uint8: np.ndarray | None, saliency: np.ndarray, *,
               out_dir: str | os.PathLike, stem: str,
               colormap_name: str = "inferno", alpha: float = 0.5,
               clip_percentile: float = 99.5, sign: str = "abs",
               caption: str | None = None) -> dict[str, pathlib.Path]:
    """Write the pictures of one saliency map, at a size a person can read.

    Every picture has the display size: the image's own size (the
    saliency's without an image), enlarged by a whole factor (nearest
    neighbour) when its short side is under :data:`MIN_SHORT_SIDE` pixels.
    Files written in ``out_dir`` (created if missing):

    * ``<stem>_figure.png``: the image, the overlay and the guided picture
      side by side under ``caption`` (the class and score), the one to look
      at first; only when an image is given;
    * ``<stem>_heatmap.png``: the colour-mapped heat;
    * ``<stem>_overlay.png``: the heat blended over the image by the heat
      (see :func:`overlay`); only when an image is given;
    * ``<stem>_guided.png``: the guided-backprop picture.

    Args:
      image_uint8: ``[H, W, 3]`` uint8 RGB image the saliency explains, or
        None for no overlay and figure.
      saliency: ``[h, w, C]`` (C = 1 or 3, as :func:`guided_image` needs) or
        ``[h, w]`` gradient.
      out_dir: output directory.
      stem: file-name prefix (no directory separators).
      colormap_name: one of :data:`COLORMAP_NAMES`.
      alpha: heat weight in the overlay at full heat, in [0, 1].
      clip_percentile: white point of the heat map, see :func:`saliency_heat`.
      sign: which gradient signs make heat, one of :data:`SIGNS`.
      caption: the figure's text line (default: the stem).
    Returns:
      ``{"figure": path, "heatmap": path, "overlay": path, "guided": path}``
      (no ``"figure"`` and ``"overlay"`` without an image).
    """
    if not isinstance(stem, str) or not stem or stem in (".", "..") or any(
            sep in stem for sep in ("/", "\\", os.sep)):
        _fail(f"stem must be a non-empty file-name prefix without directory "
              f"separators; got {stem!r}")
    # Compute everything before writing anything, so a bad argument never
    # leaves a partial set of files behind.
    pictures = render_pictures(image_uint8, saliency, colormap_name=colormap_name, alpha=alpha,
                               clip_percentile=clip_percentile, sign=sign,
                               caption=stem if caption is None else caption)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {kind: write_png(out / f"{stem}_{kind}.png", picture)
            for kind, picture in pictures.items()}
