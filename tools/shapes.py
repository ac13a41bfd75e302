"""Synthetic "shapes" images for testing guided-backpropagation saliency.

Each example is a 32x32 RGB picture of one filled shape (circle, square,
triangle or cross) drawn in a random colour, at a random position and size,
on a noisy random-coloured background.  Alongside each image comes a boolean
mask of exactly the shape's pixels, so tests can check that a saliency map
puts its heat on the object rather than on the background noise.

Only numpy is needed; everything is deterministic given a seed.

    >>> images, labels, masks = make_dataset(8, seed=0)
    >>> images.shape, labels.shape, masks.shape
    ((8, 32, 32, 3), (8,), (8, 32, 32))
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

IMAGE_SIZE = 32

# Shapes keep this many pixels clear of the image border, so the whole shape
# (and a little background around it) is always visible.
BORDER_MARGIN = 1

# Bounding-box extent of a shape, in pixels (inclusive range).
MIN_EXTENT = 9
MAX_EXTENT = 19

# Per-pixel, per-channel Gaussian noise (in 0..255 units) over the whole
# image.  Strong enough that the background is clearly textured, weak enough
# that the shape stays obvious.
NOISE_STDDEV = 20.0

# Background and shape base colours are drawn from this range so that noise
# around them is rarely clipped.
COLOUR_LOW = 30
COLOUR_HIGH = 226

# Minimum Euclidean RGB distance between shape and background colours, so
# the shape is visually clear against its background.
MIN_COLOUR_DISTANCE = 120.0


def _pixel_centres() -> tuple[np.ndarray, np.ndarray]:
    """Returns (rows, cols) grids with the centre coordinates of each pixel."""
    centres = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
    return np.meshgrid(centres, centres, indexing="ij")


def _circle_mask(top: float, left: float, extent: float) -> np.ndarray:
    """A filled disk inscribed in the square box at (top, left)."""
    rows, cols = _pixel_centres()
    radius = extent / 2.0
    centre_row, centre_col = top + radius, left + radius
    return (rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= radius**2


def _square_mask(top: float, left: float, extent: float) -> np.ndarray:
    """A filled axis-aligned square filling the box at (top, left)."""
    rows, cols = _pixel_centres()
    return (
        (rows >= top) & (rows <= top + extent)
        & (cols >= left) & (cols <= left + extent)
    )


def _triangle_mask(top: float, left: float, extent: float) -> np.ndarray:
    """A filled upward-pointing isosceles triangle filling the box."""
    rows, cols = _pixel_centres()
    # Fraction of the way down the box; the half-width grows linearly with it.
    depth = (rows - top) / extent
    half_width = depth * extent / 2.0
    centre_col = left + extent / 2.0
    return (depth >= 0.0) & (depth <= 1.0) & (np.abs(cols - centre_col) <= half_width)


def _cross_mask(top: float, left: float, extent: float) -> np.ndarray:
    """A filled plus sign whose arms span the box, about a third as thick."""
    rows, cols = _pixel_centres()
    half_thickness = max(1.5, extent / 6.0)
    centre_row, centre_col = top + extent / 2.0, left + extent / 2.0
    inside_box = (
        (rows >= top) & (rows <= top + extent)
        & (cols >= left) & (cols <= left + extent)
    )
    on_horizontal_arm = np.abs(rows - centre_row) <= half_thickness
    on_vertical_arm = np.abs(cols - centre_col) <= half_thickness
    return inside_box & (on_horizontal_arm | on_vertical_arm)


_MASK_DRAWERS = (_circle_mask, _square_mask, _triangle_mask, _cross_mask)
assert len(_MASK_DRAWERS) == len(CLASS_NAMES)


def _random_shape_mask(rng: np.random.Generator, class_index: int) -> np.ndarray:
    """Draws the class's shape at a random size and position; returns its mask."""
    extent = float(rng.integers(MIN_EXTENT, MAX_EXTENT + 1))
    # Leave BORDER_MARGIN pixels free on every side (plus rounding slack).
    max_offset = IMAGE_SIZE - BORDER_MARGIN - extent - 1.0
    top = rng.uniform(BORDER_MARGIN, max_offset)
    left = rng.uniform(BORDER_MARGIN, max_offset)
    return _MASK_DRAWERS[class_index](top, left, extent)


def _random_colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Returns (background, shape) RGB colours that contrast clearly."""
    background = rng.uniform(COLOUR_LOW, COLOUR_HIGH, size=3)
    while True:
        shape = rng.uniform(COLOUR_LOW, COLOUR_HIGH, size=3)
        if np.linalg.norm(shape - background) >= MIN_COLOUR_DISTANCE:
            return background, shape


def make_example(rng: np.random.Generator, class_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Makes one image of the given class.

    Args:
      rng: source of randomness, e.g. `numpy.random.default_rng(seed)`.
      class_index: index into CLASS_NAMES.

    Returns:
      (image, mask): a uint8 [32, 32, 3] image and a bool [32, 32] mask that is
      True exactly on the shape's pixels.
    """
    if not 0 <= class_index < len(CLASS_NAMES):
        raise ValueError(f"class_index must be in [0, {len(CLASS_NAMES)}), got {class_index}")
    mask = _random_shape_mask(rng, class_index)
    background, shape = _random_colour_pair(rng)
    image = np.where(mask[..., None], shape, background)
    image = image + rng.normal(0.0, NOISE_STDDEV, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, mask


def make_dataset(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Makes n shuffled examples with (as nearly as possible) balanced classes.

    Args:
      n: number of examples.
      seed: seed for `numpy.random.default_rng`; equal seeds give equal data.

    Returns:
      (images, labels, masks): uint8 [n, 32, 32, 3], int64 [n] class indices
      and bool [n, 32, 32] shape masks.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = np.random.default_rng(seed)
    # Cycling through the classes makes the counts differ by at most one.
    labels = rng.permutation(np.arange(n, dtype=np.int64) % len(CLASS_NAMES))
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    masks = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i, label in enumerate(labels):
        images[i], masks[i] = make_example(rng, int(label))
    return images, labels, masks
