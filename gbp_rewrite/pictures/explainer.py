"""`explain`: run an explainable export on image files and write saliency pictures.

    gbp_rewrite.explain("models/shapes_explainable", "photos/", out_dir="out")

For each image: <stem>_figure.png (the image, the overlay and the guided picture side by side,
captioned with the class name and score: the one to look at first), <stem>_heatmap.png (the
saliency as a heat map), <stem>_overlay.png (the heat blended over the image by the heat) and
<stem>_guided.png (the guided-backpropagation picture), all at the image's own size enlarged to
at least 224 px (gbp_rewrite.pictures.render); with top_k, <stem>_top<k>_* per class. For an
export converted with --cam also <stem>_gradcam.png (the Grad-CAM heat over the image) and
<stem>_guided_gradcam.png, at the same size. For the
run: results.csv (one line per explained class) and summary.json; a later run into the same
folder first removes the pictures this summary lists. Images stream through tf.data in batches and every batch is written before the next
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
from gbp_rewrite import security, write
from gbp_rewrite.errors import ImageError, OptionError, OutputError, RenderError, SourceModelError, one_line
from gbp_rewrite.conventions import CLASS_INDEX, EXPLAIN_CLASS_SIGNATURE, EXPLAINED_CLASS, REPORT_JSON, untrained_warning
from gbp_rewrite.pictures import labels as label_names
from gbp_rewrite.pictures.results import ResultFiles, remove_previous_pictures

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

    def run(self, pixels: np.ndarray, class_index: int | np.ndarray | None) -> dict[str, np.ndarray]:
        """Outputs of the signature for one batch: the explained output, saliency, class.

        `class_index`: None for each image's top class, else one class for all or one per image."""
        inputs = {self.input_key: tf.constant(pixels)}
        signatures = self.loaded.signatures
        if class_index is None:
            outputs = signatures[self.signature_key](**inputs)
        else:
            classes = tf.constant(np.broadcast_to(np.asarray(class_index, np.int64), [len(pixels)]))
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
    rank: int = 1  # 1 for the top class (or the class asked for), k for the k-th best with top_k
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
    (UnsafeModelError) unless `allow_file_ops`: explaining runs it (gbp_rewrite.security). A TF
    Serving base path (folders 1, 2, ...) means its highest version, as the server would serve."""
    path = write.resolve_served_version(path, command="explain")
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
    described = f"{key}: {spec.dtype.name} {spec.shape}"
    return images.require_rgb_input(spec.shape, spec.dtype, refusals={
        images.NOT_RGB_INPUT: SourceModelError(
            f"the model '{path}' takes {described}; explain feeds RGB images to models whose input is "
            "float [batch, height, width, 3]"),
        images.NO_FIXED_SIZE: SourceModelError(
            f"the model '{path}' takes {described}, with no fixed height and width; explain resizes "
            "images to the model's input size, so it needs a model with a fixed input size"),
    })


# ---------------------------------------------------------------------------------------------
# Running


def explain_batches(
    model: ExplainableModel,
    paths: Sequence[str],
    *,
    class_index: int | None = None,
    top_k: int = 1,
    preprocess: str = "unit",
    batch_size: int = 32,
    grayscale_to_rgb: bool = False,
) -> Iterator[list[Explained | Failed]]:
    """Explain `paths` batch by batch; each batch's results come in the order of `paths`, with
    `top_k` Explained per image (its best classes, best first) when top_k > 1."""
    check_class(model, class_index)
    _check_top_k(model, top_k, class_index)
    if batch_size < 1:
        raise OptionError(f"batch_size must be at least 1; got {batch_size}")
    expected = 0  # the next index the stream should deliver; a gap means dropped files
    warned = False
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
            pixels = batch["pixels"].numpy()[rows]
            ranked = [model.run(pixels, class_index)]
            if not warned:  # once per run, on its first batch: the map is then noise
                warned = _warn_if_untrained(model, ranked[0][model.output_key], len(rows))
            if top_k > 1:  # the top class came with the first run; the next ones by explain_class
                order = _best_classes(model, ranked[0][model.output_key], top_k)
                ranked += [model.run(pixels, order[:, rank]) for rank in range(1, top_k)]
            encoded = batch["encoded"].numpy()
            for n, (slot, row) in enumerate(good):
                results[slot] = [_explained(model, outputs, n, int(indices[row]), paths, encoded[row], rank)
                                 for rank, outputs in enumerate(ranked, start=1)]
        yield [item for entry in results for item in (entry if isinstance(entry, list) else [entry])]
    tail = [Failed(i, paths[i], images.diagnose(paths[i])) for i in range(expected, len(paths))]
    if tail:
        yield tail


def check_class(model: ExplainableModel, class_index: int | None) -> None:
    """OptionError unless `class_index` is None or a class of the model's explained output."""
    if class_index is not None and not 0 <= class_index < model.num_classes:
        raise OptionError(
            f"--class {class_index} is out of range; output {model.output_key!r} of '{model.path}' has "
            f"{model.num_classes} classes (0 to {model.num_classes - 1})"
        )


def _warn_if_untrained(model: ExplainableModel, values: np.ndarray, count: int) -> bool:
    """Log the untrained-or-saturated warning when the batch's outputs say so; True if logged."""
    warning = untrained_warning(values, where=f"the first {count} image(s)")
    if warning:
        log.warning("%s ('%s')", warning, model.path)
    return bool(warning)


def _check_top_k(model: ExplainableModel, top_k: int, class_index: int | None) -> None:
    if top_k < 1 or top_k > model.num_classes:
        raise OptionError(f"--top_k {top_k} is out of range; output {model.output_key!r} of '{model.path}' "
                          f"has {model.num_classes} classes (1 to {model.num_classes})")
    if top_k > 1 and class_index is not None:
        raise OptionError(f"--top_k {top_k} and --class {class_index} exclude each other: --class "
                          "explains one class for every image, --top_k each image's best classes")


def _best_classes(model: ExplainableModel, values: np.ndarray, k: int) -> np.ndarray:
    """[batch, k] class indices, best first, from the explained output's values."""
    values = np.asarray(values).reshape(len(values), -1)
    if model.binary:  # one unit p: class 1 scores p, class 0 scores 1 - p
        values = np.concatenate([1.0 - values, values], axis=1)
    return np.argsort(-values, axis=1, kind="stable")[:, :k]


def _explained(model, outputs, n: int, index: int, paths, encoded: bytes, rank: int = 1) -> Explained:
    cam = {key: outputs[key][n] for key in model.cam_keys}  # empty unless converted with --cam
    return Explained(index, paths[index], *explained_values(model, outputs, n), encoded, rank, cam)


def explained_values(model: ExplainableModel, outputs: dict[str, np.ndarray], n: int) -> tuple[int, float, np.ndarray]:
    """(class, score, saliency) of example `n` of `model.run`'s outputs."""
    explained_class = int(outputs[EXPLAINED_CLASS][n])
    values = outputs[model.output_key][n]
    if model.binary:  # the probability of the explained class
        p = float(np.reshape(values, [-1])[0])
        score = p if explained_class == 1 else 1.0 - p
    else:
        score = float(values if np.ndim(values) == 0 else values[explained_class])
    return explained_class, score, outputs[model.saliency_key][n]


# ---------------------------------------------------------------------------------------------
# The whole run


def explain(
    model: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out_dir: str | os.PathLike,
    class_index: int | None = None,
    top_k: int = 1,
    labels: str | os.PathLike | Sequence[str] | None = None,
    preprocess: str = "unit",
    batch_size: int = 32,
    grayscale_to_rgb: bool = False,
    recursive: bool = False,
    colormap: str = "inferno",
    alpha: float = 0.5,
    clip_percentile: float = 99.5,
    sign: str = "abs",
    progress: Progress | None = None,
    allow_file_ops: bool = False,
) -> ExplainSummary:
    """Explain image files with an explainable export and write the pictures and results.

    Args:
      model: a directory written by `gbp-rewrite convert` (or `gbp_rewrite.convert`), or a TF
        Serving base path (its highest version).
      inputs: a folder (its PNG, JPEG, BMP and GIF files, sorted by name; other files are skipped
        and named), or a list of image files.
      out_dir: where the PNGs, results.csv and summary.json go (created if missing). The pictures
        an earlier run listed in its summary.json there are removed first (only those).
      class_index: explain this class for every image (the `explain_class` signature) instead of
        each image's top class.
      top_k: explain each image's k best classes (pictures <stem>_top1_*, <stem>_top2_*, ...).
      labels: the class names, in class order: a list, or a file with one name per line or a JSON
        list (gbp_rewrite.pictures.labels); they caption the figures and fill results' label.
      preprocess: how the model expects its pixels, as Keras applications do: 'unit' (x/255),
        'symmetric' (x/127.5 - 1), 'caffe' (BGR minus ImageNet means) or 'none' (0..255).
      batch_size: images per model call (memory use grows with it, not with the number of images).
      grayscale_to_rgb: explain grey-scale images as RGB (otherwise they are refused).
      recursive: with a folder, take the images of its subfolders too.
      colormap, alpha, clip_percentile, sign: how the heat is drawn (gbp_rewrite.pictures.render:
        the colormap, the overlay's weight at full heat, the heat's white point, and which
        gradient signs make heat: 'abs', 'positive' or 'negative').
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
    drawing = dict(colormap_name=colormap, alpha=alpha, clip_percentile=clip_percentile, sign=sign)
    render.check_options(**drawing)
    names = label_names.load_labels(labels) if isinstance(labels, (str, os.PathLike)) else labels
    paths, skipped, folder = _resolve_inputs(inputs, recursive=recursive, out_dir=Path(out_dir))
    # The model and class first: a run refused for them leaves no empty output folder behind.
    loaded = load_model(model, allow_file_ops=allow_file_ops)
    check_class(loaded, class_index)
    _check_top_k(loaded, top_k, class_index)
    label_names.check_labels(names, loaded.num_classes, model=loaded.path)
    out_dir = _prepare_out_dir(Path(out_dir), folder)
    stems = _unique_stems(paths)
    header = {
        "model": str(model), "signature": loaded.signature_key, "explained_output": loaded.output_key,
        "class_index": class_index, "top_k": top_k, "preprocess": preprocess, "batch_size": batch_size,
        "grayscale_to_rgb": grayscale_to_rgb, "colormap": colormap, "alpha": alpha,
        "clip_percentile": clip_percentile, "sign": sign,
    }
    failed: list[Failed] = []
    explained = done = 0
    with ResultFiles(out_dir, header, cam=bool(loaded.cam_keys)) as results:
        for batch in explain_batches(loaded, paths, class_index=class_index, top_k=top_k,
                                     preprocess=preprocess, batch_size=batch_size,
                                     grayscale_to_rgb=grayscale_to_rgb):
            for item in batch:
                if isinstance(item, Explained):
                    stem = stems[item.index] + (f"_top{item.rank}" if top_k > 1 else "")
                    name = label_names.class_name(names, item.class_index)
                    outcome = _render(item, out_dir, stem, _caption(name, item, top_k), drawing)
                else:
                    outcome = item
                if isinstance(outcome, Failed):
                    failed.append(outcome)
                    results.add_failed(outcome.file, outcome.reason)
                    log.info("%s: %s", outcome.file, outcome.reason)
                else:
                    label = names[item.class_index] if names is not None else None
                    results.add_explained(item.file, item.class_index, item.score, outcome,
                                          label=label, rank=item.rank)
                    explained += item.rank == 1
            results.flush()
            done += len({item.index for item in batch})
            if progress is not None:
                progress(done, len(paths))
        seconds = time.perf_counter() - started
        results.finish(skipped=[dataclasses.asdict(s) for s in skipped], seconds=seconds)
    return ExplainSummary(str(model), str(out_dir), len(paths), explained, failed, skipped,
                          str(results.csv_path), str(results.json_path), seconds)


def _caption(name: str, item: Explained, top_k: int) -> str:
    return figure_caption(name, item.class_index, item.score, rank=item.rank, top_k=top_k)


def figure_caption(name: str, class_index: int, score: float, *, rank: int = 1, top_k: int = 1) -> str:
    """The figure's text: the class name (and number), the score, the rank with top_k."""
    number = "" if name == f"class {class_index}" else f" (class {class_index})"
    rank_text = f"#{rank} " if top_k > 1 else ""
    return f"{rank_text}{name}{number}  score {score:.4f}"


def _resolve_inputs(inputs, *, recursive: bool, out_dir: Path) -> tuple[list[str], list[images.Skipped], Path | None]:
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir():
        paths, skipped = images.list_folder(inputs, recursive=recursive, exclude=out_dir)
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
    removed = remove_previous_pictures(out_dir)
    if removed:
        log.info("removed %d picture(s) of the previous run in %s", len(removed), out_dir)
    return out_dir


def _unique_stems(paths: Sequence[str]) -> list[str]:
    """One output name stem per input: its file name stem, made unique with _2, _3, ..."""
    return images.unique_names([Path(p).stem or "image" for p in paths])


def _render(item: Explained, out_dir: Path, stem: str, caption: str, drawing: dict) -> dict[str, str] | Failed:
    """Write the item's pictures: {kind: file name}, or Failed if its saliency is unusable."""
    try:
        image = item.image()
        written = render.render_all(image, item.saliency, out_dir=out_dir, stem=stem,
                                    caption=caption, **drawing)
        if item.cam:
            written.update(cam_pictures.render_cam(image, item.cam, out_dir=out_dir, stem=stem))
    except RenderError as e:  # e.g. a NaN saliency: this image fails, the run goes on
        return Failed(item.index, item.file, f"cannot render the saliency: {e}")
    except OSError as e:
        raise OutputError(f"cannot write the pictures of '{item.file}' to '{out_dir}': {one_line(e)}") from None
    return {kind: path.name for kind, path in written.items()}
