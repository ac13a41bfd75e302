"""`explain`: run an explainable export on image files and write saliency pictures.

    gbp_rewrite.explain("models/shapes_explainable", "photos/", out_dir="out")

For each image: <stem>_heatmap.png (the saliency as a heat map, at the model's input size),
<stem>_overlay.png (the heat map over the image, at the image's own size) and <stem>_guided.png
(the guided-backpropagation picture), and for an export converted with --cam <stem>_gradcam.png
(the Grad-CAM heat over the image) and <stem>_guided_gradcam.png; for the run: results.csv (one
line per image) and summary.json. Images stream through tf.data in batches and every batch is written before the next
is run, so memory does not grow with the number of images. Images that cannot be explained
(corrupt, not an image, grey-scale) are named with their reason; the others are still explained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from gbp_rewrite.pictures import cam_pictures, images, render
from gbp_rewrite import security
from gbp_rewrite.errors import ImageError, OptionError, OutputError, RenderError, SourceModelError, one_line
from gbp_rewrite.conventions import CLASS_INDEX, EXPLAIN_CLASS_SIGNATURE, EXPLAINED_CLASS, REPORT_JSON
from gbp_rewrite.pictures.results import ResultFiles

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done, images in all)


@dataclasses.dataclass(frozen=True)
class ExplainableModel:
    """A loaded explainable export and what `explain` needs to know about its signature."""

    path: str
    signature_key: str
    input_key: str
    saliency_key: str
    output_key: str
    num_classes: int  # the classes `explain_class` accepts (2 for a binary sigmoid output)
    spec: images.InputSpec
    loaded: object  # the restored SavedModel
    binary: bool = False  # one sigmoid unit p: class 1 scores p, class 0 scores 1 - p
    cam_keys: tuple[str, ...] = ()  # gradcam, guided_gradcam when converted with --cam

    def run(self, pixels: np.ndarray, class_index: int | None) -> dict[str, np.ndarray]:
        """Outputs of the signature for one batch: the explained output, saliency, class."""
        inputs = {self.input_key: tf.constant(pixels)}
        signatures = self.loaded.signatures
        if class_index is None:
            outputs = signatures[self.signature_key](**inputs)
        else:
            classes = tf.fill([len(pixels)], tf.constant(class_index, tf.int64))
            outputs = signatures[EXPLAIN_CLASS_SIGNATURE](**inputs, **{CLASS_INDEX: classes})
        keys = (self.output_key, self.saliency_key, EXPLAINED_CLASS, *self.cam_keys)
        return {key: outputs[key].numpy() for key in keys}


@dataclasses.dataclass
class Explained:
    """One image explained: its class, the explained output's value there, and the saliency."""

    index: int
    file: str
    class_index: int
    score: float
    saliency: np.ndarray  # [H, W, 3], the model's input size
    encoded: bytes  # the file's bytes, to decode the image at its own size
    cam: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # gradcam, guided_gradcam

    def image(self) -> np.ndarray:
        return images.decode_rgb(self.encoded).numpy()


@dataclasses.dataclass
class Failed:
    """One image that could not be explained, and why."""

    index: int
    file: str
    reason: str


@dataclasses.dataclass
class ExplainSummary:
    """What an explain run did: counts, the images that failed and the files skipped."""

    model: str
    out_dir: str
    total: int
    explained: int
    failed: list[Failed]
    skipped: list[images.Skipped]
    results_csv: str
    summary_json: str
    seconds: float

    def to_dict(self) -> dict:
        return {
            "model": self.model, "out_dir": self.out_dir, "images": self.total,
            "explained": self.explained,
            "failed": [{"file": f.file, "reason": f.reason} for f in self.failed],
            "skipped": [{"file": s.file, "reason": s.reason} for s in self.skipped],
            "results_csv": self.results_csv, "summary_json": self.summary_json, "seconds": self.seconds,
        }

    def to_text(self) -> str:
        lines = [f"explained {self.explained} of {self.total} image(s) into {self.out_dir} in "
                 f"{self.seconds:.1f} s (results: {self.results_csv}, {self.summary_json})"]
        if self.failed:
            lines.append(f"{len(self.failed)} image(s) could not be explained:")
            lines.extend(f"  {f.file}: {f.reason}" for f in self.failed)
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) skipped:")
            lines.extend(f"  {s.file}: {s.reason}" for s in self.skipped)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The model


def load_model(path: str | os.PathLike, *, allow_file_ops: bool = False) -> ExplainableModel:
    """Load an export written by `gbp-rewrite convert` and check that `explain` can feed it.

    A model whose graph reaches files or the network outside the standard savers is refused
    (UnsafeModelError) unless `allow_file_ops`: explaining runs it (gbp_rewrite.security)."""
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        what = "does not exist" if not path.exists() else "is not a SavedModel directory (no saved_model.pb)"
        raise SourceModelError(f"the model '{path}' {what}; pass a directory written by 'gbp-rewrite convert'")
    report_file = path / "assets" / REPORT_JSON
    if not report_file.is_file():
        raise _not_explainable(path, f"it has no assets/{REPORT_JSON}")
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
        signature_key, output_key = report["signature"], report["explained_output"]
        binary = str(report.get("score_plan", "")).startswith("binary")
        saliency_outputs = dict(report["saliency_outputs"])
    except (ValueError, KeyError, TypeError) as e:
        raise SourceModelError(f"the conversion report '{report_file}' is damaged: {one_line(e)}") from None
    if len(saliency_outputs) != 1:
        raise SourceModelError(
            f"the model '{path}' explains {len(saliency_outputs)} inputs "
            f"({', '.join(saliency_outputs.values())}); explain handles models with one image input"
        )
    (saliency_key, input_key), = saliency_outputs.items()
    security.check_savedmodel(path, allow=allow_file_ops, action="explaining with it")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # noqa: BLE001 - TensorFlow raises many types for damaged models
        raise SourceModelError(f"cannot load the model '{path}': {one_line(e)}") from None
    signatures = loaded.signatures
    if signature_key not in signatures or EXPLAIN_CLASS_SIGNATURE not in signatures:
        raise _not_explainable(path, f"it has no {signature_key!r} and {EXPLAIN_CLASS_SIGNATURE!r} signatures")
    serve = signatures[signature_key]
    if saliency_key not in serve.structured_outputs or output_key not in serve.structured_outputs:
        raise _not_explainable(path, f"its signature {signature_key!r} has no {saliency_key!r} output")
    spec = _input_spec(path, input_key, serve.structured_input_signature[1][input_key])
    output_shape = serve.structured_outputs[output_key].shape
    num_classes = 2 if binary else 1 if output_shape.rank == 1 else int(output_shape[-1])
    cam_keys = cam_pictures.cam_outputs(serve.structured_outputs)
    return ExplainableModel(str(path), signature_key, input_key, saliency_key, output_key, num_classes,
                            spec, loaded, binary, cam_keys)


def _not_explainable(path: Path, why: str) -> SourceModelError:
    suggestion = path.parent / f"{path.name}_explainable"
    return SourceModelError(
        f"the model '{path}' is not an explainable export ({why}); convert it first: "
        f"gbp-rewrite convert {shlex.quote(str(path))} {shlex.quote(str(suggestion))}, then explain "
        f"{shlex.quote(str(suggestion))}"
    )


def _input_spec(path: Path, key: str, spec: tf.TensorSpec) -> images.InputSpec:
    input_spec = images.rgb_input_spec(spec.shape, spec.dtype)
    described = f"{key}: {spec.dtype.name} {spec.shape}"
    if input_spec == images.NOT_RGB_INPUT:
        raise SourceModelError(
            f"the model '{path}' takes {described}; explain feeds RGB images to models whose input is "
            "float [batch, height, width, 3]"
        )
    if input_spec == images.NO_FIXED_SIZE:
        raise SourceModelError(
            f"the model '{path}' takes {described}, with no fixed height and width; explain resizes "
            "images to the model's input size, so it needs a model with a fixed input size"
        )
    return input_spec


# ---------------------------------------------------------------------------------------------
# Running


def explain_batches(
    model: ExplainableModel,
    paths: Sequence[str],
    *,
    class_index: int | None = None,
    preprocess: str = "unit",
    batch_size: int = 32,
    grayscale_to_rgb: bool = False,
) -> Iterator[list[Explained | Failed]]:
    """Explain `paths` batch by batch; each batch's results come in the order of `paths`."""
    _check_class(model, class_index)
    if batch_size < 1:
        raise OptionError(f"batch_size must be at least 1; got {batch_size}")
    expected = 0  # the next index the stream should deliver; a gap means dropped files
    stream = images.dataset(paths, spec=model.spec, mode=preprocess, batch_size=batch_size)
    for batch in stream:
        indices = batch["index"].numpy()
        channels = batch["channels"].numpy()
        results: list[Explained | Failed | None] = []
        good = []
        for row, index in enumerate(indices):
            results.extend(Failed(i, paths[i], images.diagnose(paths[i])) for i in range(expected, index))
            expected = index + 1
            problem = images.channel_problem(int(channels[row]), grayscale_to_rgb=grayscale_to_rgb)
            if problem:
                results.append(Failed(int(index), paths[index], problem))
            else:
                good.append((len(results), row))
                results.append(None)
        if good:
            rows = [row for _, row in good]
            outputs = model.run(batch["pixels"].numpy()[rows], class_index)
            encoded = batch["encoded"].numpy()
            for n, (slot, row) in enumerate(good):
                results[slot] = _explained(model, outputs, n, int(indices[row]), paths, encoded[row])
        yield results
    tail = [Failed(i, paths[i], images.diagnose(paths[i])) for i in range(expected, len(paths))]
    if tail:
        yield tail


def _check_class(model: ExplainableModel, class_index: int | None) -> None:
    if class_index is not None and not 0 <= class_index < model.num_classes:
        raise OptionError(
            f"--class {class_index} is out of range; output {model.output_key!r} of '{model.path}' has "
            f"{model.num_classes} classes (0 to {model.num_classes - 1})"
        )


def _explained(model, outputs, n: int, index: int, paths, encoded: bytes) -> Explained:
    explained_class = int(outputs[EXPLAINED_CLASS][n])
    values = outputs[model.output_key][n]
    if model.binary:  # the probability of the explained class
        p = float(np.reshape(values, [-1])[0])
        score = p if explained_class == 1 else 1.0 - p
    else:
        score = float(values if np.ndim(values) == 0 else values[explained_class])
    cam = {key: outputs[key][n] for key in model.cam_keys}
    return Explained(index, paths[index], explained_class, score, outputs[model.saliency_key][n], encoded, cam)


# ---------------------------------------------------------------------------------------------
# The whole run


def explain(
    model: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out_dir: str | os.PathLike,
    class_index: int | None = None,
    preprocess: str = "unit",
    batch_size: int = 32,
    grayscale_to_rgb: bool = False,
    progress: Progress | None = None,
    allow_file_ops: bool = False,
) -> ExplainSummary:
    """Explain image files with an explainable export and write the pictures and results.

    Args:
      model: a directory written by `gbp-rewrite convert` (or `gbp_rewrite.convert`).
      inputs: a folder (its PNG, JPEG, BMP and GIF files, sorted by name; other files are skipped
        and named), or a list of image files.
      out_dir: where the PNGs, results.csv and summary.json go (created if missing).
      class_index: explain this class for every image (the `explain_class` signature) instead of
        each image's top class.
      preprocess: how the model expects its pixels, as Keras applications do: 'unit' (x/255),
        'symmetric' (x/127.5 - 1), 'caffe' (BGR minus ImageNet means) or 'none' (0..255).
      batch_size: images per model call (memory use grows with it, not with the number of images).
      grayscale_to_rgb: explain grey-scale images as RGB (otherwise they are refused).
      progress: called after each batch with (images done, images in all).
      allow_file_ops: run a model whose graph reaches files or the network outside the standard
        savers (refused by default, as by `convert`: explaining runs the model).

    Returns:
      The summary; images that failed are listed in it (the run goes on without them).

    Raises:
      GbpError: the model cannot be used, an option is invalid, or the output cannot be written.
    """
    started = time.perf_counter()
    images.check_preprocess(preprocess)
    paths, skipped, folder = _resolve_inputs(inputs)
    # The model and class first: a run refused for them leaves no empty output folder behind.
    loaded = load_model(model, allow_file_ops=allow_file_ops)
    _check_class(loaded, class_index)
    out_dir = _prepare_out_dir(Path(out_dir), folder)
    stems = _unique_stems(paths)
    header = {
        "model": str(model), "signature": loaded.signature_key, "explained_output": loaded.output_key,
        "class_index": class_index, "preprocess": preprocess, "batch_size": batch_size,
        "grayscale_to_rgb": grayscale_to_rgb,
    }
    failed: list[Failed] = []
    explained = done = 0
    with ResultFiles(out_dir, header, cam=bool(loaded.cam_keys)) as results:
        for batch in explain_batches(loaded, paths, class_index=class_index, preprocess=preprocess,
                                     batch_size=batch_size, grayscale_to_rgb=grayscale_to_rgb):
            for item in batch:
                outcome = _render(item, out_dir, stems[item.index]) if isinstance(item, Explained) else item
                if isinstance(outcome, Failed):
                    failed.append(outcome)
                    results.add_failed(outcome.file, outcome.reason)
                    log.info("%s: %s", outcome.file, outcome.reason)
                else:
                    results.add_explained(item.file, item.class_index, item.score, outcome)
                    explained += 1
            results.flush()
            done += len(batch)
            if progress is not None:
                progress(done, len(paths))
        seconds = time.perf_counter() - started
        results.finish(skipped=[dataclasses.asdict(s) for s in skipped], seconds=seconds)
    return ExplainSummary(str(model), str(out_dir), len(paths), explained, failed, skipped,
                          str(results.csv_path), str(results.json_path), seconds)


def _resolve_inputs(inputs) -> tuple[list[str], list[images.Skipped], Path | None]:
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir():
        paths, skipped = images.list_folder(inputs)
        folder = Path(inputs)
    else:
        paths = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(p) for p in inputs]
        skipped, folder = [], None
    if not paths:
        where = f"the folder '{inputs}'" if folder is not None else "the arguments"
        raise ImageError(f"no image files in {where}; explain reads {', '.join(images.IMAGE_EXTENSIONS)}")
    return paths, skipped, folder


def _prepare_out_dir(out_dir: Path, folder: Path | None) -> Path:
    if folder is not None and out_dir.resolve() == folder.resolve():
        raise OutputError(
            f"--out '{out_dir}' is the image folder itself; choose another folder, so the pictures "
            "are not mixed with (and later taken for) the input images"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder '{out_dir}': {e.strerror}") from None
    return out_dir


def _unique_stems(paths: Sequence[str]) -> list[str]:
    """One output name stem per input: its file name stem, made unique with _2, _3, ..."""
    return images.unique_names([Path(p).stem or "image" for p in paths])


def _render(item: Explained, out_dir: Path, stem: str) -> dict[str, str] | Failed:
    """Write the item's pictures: {kind: file name}, or Failed if its saliency is unusable."""
    try:
        image = item.image()
        written = render.render_all(image, item.saliency, out_dir=out_dir, stem=stem)
        if item.cam:
            written.update(cam_pictures.render_cam(image, item.cam, out_dir=out_dir, stem=stem))
    except RenderError as e:  # e.g. a NaN saliency: this image fails, the run goes on
        return Failed(item.index, item.file, f"cannot render the saliency: {e}")
    except OSError as e:
        raise OutputError(f"cannot write the pictures of '{item.file}' to '{out_dir}': {one_line(e)}") from None
    return {kind: path.name for kind, path in written.items()}
