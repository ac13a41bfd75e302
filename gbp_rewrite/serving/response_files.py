"""A decoded TF Serving response on disk: one .npy per output and saliency pictures per example.

    <out>/<output key>.npy                 the batched array, as decoded
    <out>/<stem>_<saliency key>_heatmap.png   for every saliency output ('saliency',
    <out>/<stem>_<saliency key>_guided.png    'saliency_<input>'), per example; with the request's
    <out>/<stem>_<saliency key>_overlay.png   images also the overlay and the figure (image,
    <out>/<stem>_<saliency key>_figure.png    overlay, guided picture; caption: the explained
                                              class, by name with labels)

`stem` is the image's file name stem when the images are given, else example_<i>. The pictures
are render.render_all's, so a saliency whose channels are not 1 or 3 (no guided picture) is a
RenderError, with or without the images.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from gbp_rewrite.pictures import images, render
from gbp_rewrite.conventions import EXPLAINED_CLASS
from gbp_rewrite.errors import ImageError, OutputError, RenderError
from gbp_rewrite.pictures.labels import class_name


def saliency_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Outputs that are saliency maps: 'saliency' or 'saliency_*', [batch, H, W] or [batch, H, W, C]."""
    return [key for key, value in arrays.items()
            if (key == "saliency" or key.startswith("saliency_")) and value.ndim in (3, 4)
            and np.issubdtype(value.dtype, np.floating)]


def write_response_files(
    arrays: Mapping[str, np.ndarray],
    out_dir: str | os.PathLike,
    *,
    image_paths: Sequence[str | os.PathLike] | None = None,
    labels: Sequence[str] | None = None,
) -> list[Path]:
    """Write every output as .npy and every example's saliency as PNGs; return the files written.

    Args:
      arrays: decoded outputs (gbp_rewrite.serving.rest.decode_response), batch first.
      out_dir: the folder to write into (created if missing; files of the same names are replaced).
      image_paths: the request's images, in request order, for the overlays (optional).
      labels: the class names, in class order, for the figures' captions (optional).
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder '{out_dir}': {e.strerror}") from None
    keys = saliency_keys(arrays)
    paths = [str(p) for p in image_paths or []]
    batch = len(arrays[keys[0]]) if keys else None
    if paths and keys and len(paths) != batch:
        raise ImageError(f"{len(paths)} image(s) given for a response of {batch} example(s); pass the "
                         "request's images in the request's order, or none")
    written = [_save_npy(out_dir, key, value) for key, value in arrays.items()]
    stems = _stems(paths, batch or 0)
    for index in range(batch or 0):
        image = _read_rgb(paths[index]) if paths else None
        caption = _caption(arrays, index, labels)
        for key in keys:
            written.extend(_render(out_dir, f"{stems[index]}_{key}", arrays[key][index], image, caption))
    written.extend(_write_pngs(out_dir, arrays, stems if paths else None))
    return written


def png_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Outputs that are PNG pictures already (--saliency_png): saliency_png*_bytes, strings [batch]."""
    return [key for key, value in arrays.items()
            if re.fullmatch(r"saliency_png\w*_bytes", key) and value.ndim == 1 and value.dtype.kind in "OS"]


def _write_pngs(out_dir: Path, arrays: Mapping[str, np.ndarray], stems: list[str] | None) -> list[Path]:
    """Each example's PNG of each png output as <stem>_<key less _bytes>.png, bytes as served."""
    written = []
    for key in png_keys(arrays):
        names = stems or _stems([], len(arrays[key]))
        for name, data in zip(names, arrays[key]):
            path = out_dir / f"{name}_{key[:-len('_bytes')]}.png"
            path.write_bytes(bytes(data))
            written.append(path)
    return written


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key).lstrip(".") or "output"


def _save_npy(out_dir: Path, key: str, value: np.ndarray) -> Path:
    path = out_dir / f"{_safe_name(key)}.npy"
    np.save(path, value)
    return path


def _stems(paths: list[str], batch: int) -> list[str]:
    """One file name stem per example: the image's (made safe and unique), else example_<i>."""
    if not paths:
        return [f"example_{i}" for i in range(batch)]
    return images.unique_names([_safe_name(Path(path).stem) for path in paths])


def _read_rgb(path: str) -> np.ndarray:
    try:
        return images.decode_rgb(tf.io.read_file(path).numpy()).numpy()
    except (tf.errors.OpError, ValueError):
        raise ImageError(f"'{path}': {images.diagnose(path)}") from None


def _caption(arrays: Mapping[str, np.ndarray], index: int, labels: Sequence[str] | None) -> str | None:
    """The explained class of example `index`, by name when there are labels (None: no class output)."""
    classes = arrays.get(EXPLAINED_CLASS)
    if classes is None or np.ndim(classes) != 1:
        return None
    return class_name(labels, int(classes[index])) + (f" (class {int(classes[index])})" if labels else "")


def _render(out_dir: Path, stem: str, saliency: np.ndarray, image: np.ndarray | None,
            caption: str | None) -> list[Path]:
    try:
        return list(render.render_all(image, saliency, out_dir=out_dir, stem=stem, caption=caption).values())
    except RenderError as e:
        raise RenderError(f"cannot render {stem}: {e}") from None
