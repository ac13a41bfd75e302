"""The sanity chart as a PNG, drawn with numpy (no plotting library): one line per method.

x: the cascade's steps (0 = the original model, then one more layer randomised per step, from the
output down); y: the mean of the Spearman rank correlations of |map| and of the signed map with
the original's (what the verdicts average), from -1 (bottom) to 1 (top), grid lines at -1, -0.5, 0, 0.5 and 1 (0 darker). Colours (also in the JSON's
`chart_colours`): guided red, gradcam blue, guided_gradcam purple, gradient grey; a swatch per
method in that order at the top right.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from gbp_rewrite.pictures import render

COLOURS = {
    "guided": (214, 39, 40),
    "gradcam": (31, 119, 180),
    "guided_gradcam": (148, 103, 189),
    "gradient": (127, 127, 127),
}
_WIDTH, _HEIGHT, _MARGIN = 480, 320, 30


def _to_pixel(step: float, value: float, steps: int) -> tuple[float, float]:
    x = _MARGIN + (_WIDTH - 2 * _MARGIN) * (step / max(steps, 1))
    y = _MARGIN + (_HEIGHT - 2 * _MARGIN) * (1.0 - (value + 1.0) / 2.0)
    return x, y


def _dot(canvas: np.ndarray, x: float, y: float, colour, radius: int) -> None:
    row, col = int(round(y)), int(round(x))
    canvas[max(row - radius, 0):row + radius + 1, max(col - radius, 0):col + radius + 1] = colour


def _segment(canvas, start, end, colour, radius: int = 1) -> None:
    length = int(np.hypot(end[0] - start[0], end[1] - start[1])) + 1
    for t in np.linspace(0.0, 1.0, length * 2):
        _dot(canvas, start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]), colour, radius)


def draw(series: Mapping[str, Sequence[float]]) -> np.ndarray:
    """[H, W, 3] uint8: each series (values at steps 0..n) as a line with dots."""
    canvas = np.full((_HEIGHT, _WIDTH, 3), 255, np.uint8)
    steps = max(len(v) for v in series.values()) - 1
    for level in (-1.0, -0.5, 0.0, 0.5, 1.0):
        _, y = _to_pixel(0, level, steps)
        canvas[int(round(y)), _MARGIN:_WIDTH - _MARGIN] = 120 if level == 0.0 else 215
    for step in range(steps + 1):
        x, _ = _to_pixel(step, 0.0, steps)
        canvas[_HEIGHT - _MARGIN:_HEIGHT - _MARGIN + 5, int(round(x))] = 120  # a tick per step
    for name, values in series.items():
        colour = COLOURS.get(name, (0, 0, 0))
        points = [_to_pixel(i, float(v), steps) for i, v in enumerate(values)]
        for start, end in zip(points, points[1:]):
            _segment(canvas, start, end, colour)
        for x, y in points:
            _dot(canvas, x, y, colour, 3)
    for index, name in enumerate(series):  # the legend: swatches in COLOURS' order
        left = _WIDTH - _MARGIN - 12 * (len(series) - index)
        canvas[6:16, left:left + 9] = COLOURS.get(name, (0, 0, 0))
    return canvas


def write(path: str | os.PathLike, series: Mapping[str, Sequence[float]]) -> Path:
    return render.write_png(path, draw(series))
