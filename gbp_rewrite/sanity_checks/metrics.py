"""How alike two explanation maps are: Spearman rank correlation and SSIM, as Adebayo et al. use them.

Maps are reduced to [H, W] first: the signed map sums a saliency's channels, the |map| takes the
largest magnitude over them (a Grad-CAM map is already [H, W] and non-negative: both are itself).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def signed_map(values: np.ndarray) -> np.ndarray:
    """[n, H, W, C] -> [n, H, W] sum over channels; [n, H, W] unchanged."""
    values = np.asarray(values, np.float64)
    return values.sum(axis=-1) if values.ndim == 4 else values


def magnitude_map(values: np.ndarray) -> np.ndarray:
    """[n, H, W, C] -> [n, H, W] max |value| over channels; [n, H, W] -> |value|."""
    values = np.abs(np.asarray(values, np.float64))
    return values.max(axis=-1) if values.ndim == 4 else values


def ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (0-based) of a 1-D array, ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    _, first, counts = np.unique(ordered, return_index=True, return_counts=True)
    result = np.empty(len(values), np.float64)
    result[order] = np.repeat(first + (counts - 1) / 2.0, counts)
    return result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (flattened); 0 when either is constant (e.g. all
    zero), which shares no ordering with anything."""
    ra, rb = ranks(np.ravel(a)), ranks(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


def _unit(heat: np.ndarray) -> np.ndarray:
    peak = heat.max()
    return heat / peak if peak > 0 else np.zeros_like(heat)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (tf.image.ssim) of two non-negative [H, W] maps, each scaled to max 1."""
    height, width = a.shape
    size = min(11, height, width)
    x = tf.constant(_unit(a)[None, :, :, None], tf.float32)
    y = tf.constant(_unit(b)[None, :, :, None], tf.float32)
    return float(tf.image.ssim(x, y, max_val=1.0, filter_size=size)[0])


def compare(original: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Mean over the examples of Spearman |map|, Spearman signed, SSIM |map|."""
    a_abs, b_abs = magnitude_map(original), magnitude_map(other)
    a_signed, b_signed = signed_map(original), signed_map(other)
    count = len(a_abs)
    return {
        "spearman_abs": float(np.mean([spearman(a_abs[i], b_abs[i]) for i in range(count)])),
        "spearman_signed": float(np.mean([spearman(a_signed[i], b_signed[i]) for i in range(count)])),
        "ssim": float(np.mean([ssim(a_abs[i], b_abs[i]) for i in range(count)])),
    }
