"""`sanity`: the model parameter randomisation and class-swap tests on a Keras model's maps.

    cascade     the layers with weights, from the output down: at step k the top k layers have
                their weights re-drawn from their own initializers (fixed seeds), and the four
                maps are REBUILT on those weights (sanity.maps) and compared with the original's
    class swap  the maps for each image's top class against those for its second class

A map that stays alike while the weights that made the prediction are destroyed, or that looks
the same for another class, does not show what the model learned (Adebayo et al. 2018).
Writes sanity.json, sanity.txt (the table) and sanity.png (the chart) in `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from gbp_rewrite.pictures import images
from gbp_rewrite.keras import loading as keras_loading
from gbp_rewrite.keras import front_end as keras_front_end
from gbp_rewrite.keras import signature as keras_signature
from gbp_rewrite.errors import ImageError, OptionError, OutputError, SourceModelError
from gbp_rewrite.sanity_checks import chart, maps, metrics, randomize

log = logging.getLogger(__name__)

SANITY_JSON, SANITY_TXT, SANITY_PNG = "sanity.json", "sanity.txt", "sanity.png"
# A method "fails" when its maps stay this alike or more under the cascade: its similarity (the
# mean over the steps of the Spearman correlations of |map| and of the signed map with the
# original's) is at least SIMILAR, although the weights that made the prediction are gone.
SIMILAR = 0.5


@dataclasses.dataclass
class SanityResult:
    """Per cascade step and per method: Spearman |map|, Spearman signed, SSIM vs the original."""

    model: str
    images: list[str]
    classes: list[int]
    other_classes: list[int]
    steps: list[dict]  # {"step", "layer", "metrics": {method: {...}}}
    class_swap: dict[str, dict[str, float]]
    verdicts: dict[str, str]
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    def similarity(self, method: str) -> float:
        """Mean over the cascade's steps of (Spearman |map| + Spearman signed) / 2."""
        values = [(s["metrics"][method]["spearman_abs"] + s["metrics"][method]["spearman_signed"]) / 2
                  for s in self.steps]
        return float(np.mean(values)) if values else 1.0

    def series(self) -> dict[str, list[float]]:
        """{method: [1.0 (the original itself), step 1, ...]}: (Spearman |map| + signed) / 2 per step."""
        return {m: [1.0] + [(s["metrics"][m]["spearman_abs"] + s["metrics"][m]["spearman_signed"]) / 2
                            for s in self.steps] for m in maps.METHODS}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["similarity"] = {m: self.similarity(m) for m in maps.METHODS}
        data["chart_colours"] = {m: "#%02x%02x%02x" % chart.COLOURS[m] for m in maps.METHODS}
        return data

    def to_text(self) -> str:
        width = 20
        header = f"{'step':>4}  {'randomised down to':<24}" + "".join(f"{m:<{width}}" for m in maps.METHODS)
        lines = [f"sanity of {self.model} on {len(self.images)} image(s)",
                 "cascading randomisation: Spearman |map| / Spearman signed / SSIM against the original",
                 header]
        for step in self.steps:
            cells = "".join(f"{_triple(step['metrics'][m]):<{width}}" for m in maps.METHODS)
            lines.append(f"{step['step']:>4}  {step['layer'][:24]:<24}{cells}")
        cells = "".join(f"{_triple(self.class_swap[m]):<{width}}" for m in maps.METHODS)
        lines.append(f"{'':>4}  {'class swap (2nd class)':<24}{cells}")
        lines.append("verdicts:")
        lines.extend(f"  {m}: {self.verdicts[m]}" for m in maps.METHODS)
        return "\n".join(lines)


def _triple(values: dict[str, float]) -> str:
    return f"{values['spearman_abs']:.2f}/{values['spearman_signed']:.2f}/{values['ssim']:.2f}"


def sanity(
    model,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out_dir: str | os.PathLike,
    layers_to_randomize: int | None = None,
    max_images: int = 8,
    preprocess: str = "unit",
    cam_layer: str | None = None,
    seed: int = 0,
    safe_mode: bool = True,
) -> SanityResult:
    """Run the randomisation and class-swap tests and write sanity.{json,txt,png} in `out_dir`.

    Args:
      model: a Keras model (a keras.Model, or a .keras/.h5 file): its layers' initializers are
        what the randomisation draws from. SavedModels have none and are refused.
      inputs: a folder of images (the first `max_images` by name) or a list of image files.
      out_dir: where the results go (created if missing).
      layers_to_randomize: how many layers the cascade goes down (default: all with weights).
      max_images: at most this many images (default 8: each step rebuilds the explanation).
      preprocess: as for `explain`: 'unit' (x/255), 'symmetric', 'caffe' or 'none'.
      cam_layer: Grad-CAM's layer, as for `convert`.
      seed: the base of the fixed per-layer seeds.
      safe_mode: refuse Keras files with Lambda layers (their code runs when loaded).

    Returns:
      The SanityResult (also in sanity.json). The user's model is not modified: a clone is
      randomised.
    """
    images.check_preprocess(preprocess)
    source = _load(model, safe_mode=safe_mode)
    pixels, paths = _pixels(source.model, inputs, max_images=max_images, preprocess=preprocess)
    out = _out_dir(Path(out_dir))
    work = keras_front_end.clone_model(source.model, {})  # randomised in place; the user's model is not
    layers = randomize.weighted_layers(work)
    count = len(layers) if layers_to_randomize is None else layers_to_randomize
    if not isinstance(count, int) or not 1 <= count <= len(layers):
        raise OptionError(
            f"--layers_to_randomize {layers_to_randomize!r} is out of range; the model has {len(layers)} "
            f"layers with weights (1 to {len(layers)})"
        )
    top, second = _classes(work, pixels)
    original, _ = maps.explain(work, pixels, top, cam_layer=cam_layer)
    swapped, _ = maps.explain(work, pixels, second, cam_layer=cam_layer)
    class_swap = {m: metrics.compare(original[m], swapped[m]) for m in maps.METHODS}
    steps = []
    for step, layer in enumerate(reversed(layers[-count:] if count else []), start=1):
        randomize.reinitialize(layer, seed=seed + step)
        randomised, _ = maps.explain(work, pixels, top, cam_layer=cam_layer)
        steps.append({"step": step, "layer": layer.name,
                      "metrics": {m: metrics.compare(original[m], randomised[m]) for m in maps.METHODS}})
        log.info("step %d: randomised %s", step, layer.name)
    result = SanityResult(source.description, paths, top.tolist(), second.tolist(), steps, class_swap, {})
    result.verdicts = {m: _verdict(result, m) for m in maps.METHODS}
    _write(result, out)
    return result


def _load(model, *, safe_mode: bool):
    if not keras_loading.is_keras_source(model):
        raise SourceModelError(
            f"sanity randomises a Keras model's weights with its layers' own initializers, which a "
            f"SavedModel does not keep; pass the Keras model (.keras or .h5), not '{model}'"
        )
    return keras_loading.load(model, safe_mode=safe_mode)


def _pixels(model, inputs, *, max_images: int, preprocess: str) -> tuple[np.ndarray, list[str]]:
    if max_images < 1:
        raise OptionError(f"--max_images must be at least 1; got {max_images}")
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir():
        paths, _ = images.list_folder(inputs)
    else:
        paths = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(p) for p in inputs]
    paths = paths[:max_images]
    if not paths:
        raise ImageError(f"no image files in '{inputs}'; sanity reads {', '.join(images.IMAGE_EXTENSIONS)}")
    signature = keras_signature.describe(model)
    if len(signature.inputs) != 1:
        raise SourceModelError(f"sanity explains models with one image input; this one has {len(signature.inputs)}")
    (desc,) = signature.inputs.values()
    spec = images.rgb_input_spec(desc.shape, desc.dtype)
    if isinstance(spec, str):
        raise SourceModelError(f"sanity feeds RGB images; the model takes {desc.describe()} ({spec})")
    batches = list(images.dataset(paths, spec=spec, mode=preprocess, batch_size=len(paths)))
    if not batches or len(batches[0]["index"]) != len(paths):
        raise ImageError(f"some of the images cannot be read: {', '.join(paths)}")
    return batches[0]["pixels"].numpy(), paths


def _classes(model, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(model(pixels, training=False))
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise SourceModelError(f"sanity needs a [batch, classes] output with 2 classes or more; got {scores.shape}")
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[:, 0].astype(np.int64), order[:, 1].astype(np.int64)


def _verdict(result: SanityResult, method: str) -> str:
    similarity = result.similarity(method)
    final = result.steps[-1]["metrics"][method]["spearman_abs"]
    swap = result.class_swap[method]["spearman_abs"]
    numbers = (f"mean Spearman {similarity:.2f} over {len(result.steps)} step(s), |map| {final:.2f} at the "
               f"last step, class swap {swap:.2f}")
    if similarity >= SIMILAR:
        return (f"FAILS: its maps stay alike as the weights are randomised ({numbers}); they show the "
                "input more than what the model learned")
    return f"passes: its maps change as the weights are randomised ({numbers}); they depend on what the model learned"


def _out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder '{out}': {e.strerror}") from None
    return out


def _write(result: SanityResult, out: Path) -> None:
    result.files = {"json": str(out / SANITY_JSON), "table": str(out / SANITY_TXT), "chart": str(out / SANITY_PNG)}
    try:
        chart.write(out / SANITY_PNG, result.series())
        (out / SANITY_TXT).write_text(result.to_text() + "\n", encoding="utf-8")
        (out / SANITY_JSON).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write the sanity results in '{out}': {e.strerror}") from None
