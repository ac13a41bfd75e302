"""Fast tests of the synthetic shapes generator (tools/shapes.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest

# tools/ is not a package; import the generator straight from it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import shapes  # noqa: E402

IMAGE_SIZE = 32


def test_class_names_are_distinct_strings():
    assert 3 <= len(shapes.CLASS_NAMES) <= 4
    assert len(set(shapes.CLASS_NAMES)) == len(shapes.CLASS_NAMES)
    assert all(isinstance(name, str) and name for name in shapes.CLASS_NAMES)


def test_make_dataset_shapes_and_dtypes():
    images, labels, masks = shapes.make_dataset(10, seed=0)
    assert images.shape == (10, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert labels.shape == (10,) and labels.dtype == np.int64
    assert masks.shape == (10, IMAGE_SIZE, IMAGE_SIZE) and masks.dtype == np.bool_


def test_same_seed_gives_identical_data():
    first = shapes.make_dataset(20, seed=123)
    second = shapes.make_dataset(20, seed=123)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_different_seeds_give_different_data():
    images_a, _, _ = shapes.make_dataset(20, seed=1)
    images_b, _, _ = shapes.make_dataset(20, seed=2)
    assert not np.array_equal(images_a, images_b)


@pytest.mark.parametrize("n", [0, 1, 7, 40, 101])
def test_labels_are_balanced(n):
    _, labels, _ = shapes.make_dataset(n, seed=5)
    counts = np.bincount(labels, minlength=len(shapes.CLASS_NAMES))
    assert counts.sum() == n
    assert counts.max() - counts.min() <= 1
    assert labels.min(initial=0) >= 0 and labels.max(initial=0) < len(shapes.CLASS_NAMES)


def test_labels_are_shuffled():
    _, labels, _ = shapes.make_dataset(40, seed=5)
    cyclic = np.arange(40) % len(shapes.CLASS_NAMES)
    assert not np.array_equal(labels, cyclic)


def test_masks_are_non_empty_and_clear_of_the_border():
    _, _, masks = shapes.make_dataset(200, seed=9)
    areas = masks.sum(axis=(1, 2))
    # Shapes span roughly 8-20 px, so even the smallest covers a few dozen pixels.
    assert areas.min() >= 30
    assert areas.max() < IMAGE_SIZE * IMAGE_SIZE // 2
    border = np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    border[1:-1, 1:-1] = False
    assert not masks[:, border].any()


def test_shape_extent_is_in_range():
    _, _, masks = shapes.make_dataset(200, seed=11)
    for mask in masks:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
        assert 8 <= extent <= 20


def test_shape_contrasts_with_noisy_background():
    images, _, masks = shapes.make_dataset(100, seed=13)
    for image, mask in zip(images.astype(np.float64), masks):
        shape_colour = image[mask].mean(axis=0)
        background_colour = image[~mask].mean(axis=0)
        # The shape stands out from its background ...
        assert np.linalg.norm(shape_colour - background_colour) > 60
        # ... and the background is real noise, not a flat fill.
        assert image[~mask].std(axis=0).min() > 5


@pytest.mark.parametrize("class_index", range(len(shapes.CLASS_NAMES)))
def test_make_example_per_class(class_index):
    rng = np.random.default_rng(0)
    image, mask = shapes.make_example(rng, class_index)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and mask.dtype == np.bool_
    assert mask.any()


def test_classes_have_different_shapes():
    """The same random draws give a different mask for each class."""
    masks = [
        shapes.make_example(np.random.default_rng(0), class_index)[1]
        for class_index in range(len(shapes.CLASS_NAMES))
    ]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert not np.array_equal(masks[i], masks[j])


def test_make_example_rejects_bad_class_index():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        shapes.make_example(rng, len(shapes.CLASS_NAMES))
    with pytest.raises(ValueError):
        shapes.make_example(rng, -1)
