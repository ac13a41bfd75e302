"""The pictures of an export converted with --cam: <stem>_gradcam.png and <stem>_guided_gradcam.png.

    gradcam         the Grad-CAM map ([H, W], already in [0, 1]) as heat over the image (the
                    colour map `render` uses for the overlay)
    guided_gradcam  the Guided Grad-CAM gradient as the guided-backpropagation picture

Both at the display size of explain's other pictures (gbp_rewrite.pictures.render.display_scale).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from gbp_rewrite.pictures import render
from gbp_rewrite.cam import GRADCAM, GUIDED_GRADCAM, OUTPUT_KEYS


def cam_outputs(structured_outputs: Mapping) -> tuple[str, ...]:
    """(gradcam, guided_gradcam) when a signature returns both, else ()."""
    return OUTPUT_KEYS if all(key in structured_outputs for key in OUTPUT_KEYS) else ()


def render_cam(image_uint8: np.ndarray, maps: Mapping[str, np.ndarray], *, out_dir: str | os.PathLike,
               stem: str, alpha: float = 0.5) -> dict[str, Path]:
    """Write one image's Grad-CAM pictures; {kind: path}. Raises RenderError for unusable maps."""
    # The display size of explain's other pictures: the image's own, enlarged by a whole factor
    # (nearest neighbour) when its short side is under render.MIN_SHORT_SIDE.
    factor = render.display_scale(*np.shape(image_uint8)[:2])
    height, width = np.shape(image_uint8)[0] * factor, np.shape(image_uint8)[1] * factor
    photo = render.resize_to(image_uint8, height, width).astype(np.uint8)  # whole factor: exact
    guided = render.resize_to(render.guided_image(maps[GUIDED_GRADCAM]), height, width)
    pictures = {
        GRADCAM: render.overlay(photo, np.asarray(maps[GRADCAM], np.float64), alpha=alpha),
        GUIDED_GRADCAM: np.clip(np.rint(guided), 0, 255).astype(np.uint8),
    }  # both computed before either is written
    out = Path(out_dir)
    return {kind: render.write_png(out / f"{stem}_{kind}.png", picture) for kind, picture in pictures.items()}
