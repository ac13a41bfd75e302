"""`ExplainImages`: image files (or (name, bytes) pairs) in, explain's pictures and results out.

    patterns ──MatchAll──┐
    (file, bytes) ───────┴─> output names (explain's, made unique over the whole run)
      -> read (FileSystems) -> RunInference(ExplainableModelHandler, keyed by (file, name))
      -> pictures (FileSystems) -> rows (results-*.csv, results-*.jsonl), counted in Beam metrics
      -> optional: saliency-*.parquet (the raw arrays)

Every step that can fail for one image (unreadable, undecodable, grey-scale, a saliency that
cannot be rendered) turns it into a `failed` row with the reason; nothing fails the pipeline.
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from collections.abc import Iterable
from pathlib import PurePosixPath

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from gbp_rewrite.beam.handler import ExplainableModelHandler, Explanation
from gbp_rewrite.errors import OptionError, RenderError, one_line
from gbp_rewrite.pictures import explainer, images, labels, render
from gbp_rewrite.pictures.results import (
    CSV_COLUMNS,
    PICTURES,
    explained_entry,
    failed_entry,
)

METRICS_NAMESPACE = "gbp_rewrite"
RESULTS_PREFIX = "results"  # results-SSSSS-of-NNNNN.csv / .jsonl
SALIENCY_PREFIX = "saliency"  # saliency-SSSSS-of-NNNNN.parquet
SALIENCY_FORMATS = ("parquet",)

_PATTERNS = "patterns"
_FAILED = "failed"
_SALIENCY = "saliency"
_NUMBERED = re.compile(r"^(.+)_(\d+)$")  # a stem that an earlier name's "_N" could collide with


class ExplainImages(beam.PTransform):
    """Explain images with an explainable export, writing `explain`'s pictures and results.

    Input: file patterns (str; anything Beam's FileSystems matches: local paths, gs://, s3://),
    or (file name, encoded bytes) pairs. Output: one record per image, as in explain's
    summary.json ({"file", "status": "explained", "class", "score", "outputs"} or
    {"file", "status": "failed", "reason"}), also written under `out` as sharded
    results-*.jsonl and results-*.csv (explain's results.csv columns), with the pictures
    <name>_heatmap.png, <name>_overlay.png and <name>_guided.png, named as `explain` names them.
    Counters `explained` and `failed` (namespace "gbp_rewrite") count the rows.

    Each batch of up to `batch_size` images is one model call. The numbers and pictures equal
    `explain`'s bit for bit when every image meets the same batch mates; TensorFlow's CPU
    kernels (MatMul, Conv2D) round differently for different batch sizes and rows, so other
    batchings agree to float32 rounding (about 1e-7 relative). `batch_size=1` (one image per
    model call, in both) makes each image's numbers independent of every other image.

    Args:
      model_dir: a directory written by `gbp-rewrite convert` (local, or gs://, s3://, ...).
      out: where the pictures and results go (a local folder or a FileSystems path).
      preprocess: 'unit' (x/255), 'symmetric', 'caffe' or 'none', as for `explain`.
      batch_size: images per model call.
      class_index: explain this class in every image instead of each image's top class.
      grayscale_to_rgb: explain grey-scale images as RGB (otherwise they are refused).
      allow_file_ops: run a model whose graph reaches files or the network (see `explain`).
      saliency_format: also write the raw saliency arrays: 'parquet' (saliency-*.parquet with
        columns file, class, score, shape, saliency: the array flattened, float32). None: not.
      large_model: one model per machine shared across processes, not one per process.
    """

    def __init__(self, model_dir: str, *, out: str, preprocess: str = "unit", batch_size: int = 32,
                 class_index: int | None = None, grayscale_to_rgb: bool = False,
                 allow_file_ops: bool = False, saliency_format: str | None = None,
                 large_model: bool = False):
        super().__init__()
        if batch_size < 1:
            raise OptionError(f"batch_size must be at least 1; got {batch_size}")
        if saliency_format not in (None, *SALIENCY_FORMATS):
            raise OptionError(f"unknown saliency format {saliency_format!r}; valid formats: "
                              f"{', '.join(SALIENCY_FORMATS)}")
        self._out = str(out)
        self._saliency_format = saliency_format
        self._handler = ExplainableModelHandler(
            str(model_dir), preprocess=preprocess, class_index=class_index, batch_size=batch_size,
            grayscale_to_rgb=grayscale_to_rgb, allow_file_ops=allow_file_ops, large_model=large_model)

    def expand(self, inputs):
        split = inputs | "Patterns or pairs" >> beam.ParDo(_SplitInputs()).with_outputs(_PATTERNS, main="pairs")
        matched = (split[_PATTERNS] | "Match" >> fileio.MatchAll()
                   | "Matched files" >> beam.Map(lambda metadata: (metadata.path, None)))
        files = (split.pairs, matched) | "All files" >> beam.Flatten()
        named = files | "Output names" >> _OutputNames()
        read = named | "Read" >> beam.ParDo(_Read()).with_outputs(_FAILED, main="read")
        explained = read.read | "Explain" >> RunInference(KeyedModelHandler(self._handler))
        rendered = explained | "Pictures" >> beam.ParDo(
            _Render(self._out, arrays=self._saliency_format is not None)).with_outputs(_SALIENCY, main="rows")
        rows = ((rendered.rows, read[_FAILED]) | "All rows" >> beam.Flatten()
                | "Count" >> beam.ParDo(_Count()))
        _write_rows(rows, self._out)
        if self._saliency_format == "parquet":
            _write_parquet(rendered[_SALIENCY], self._out)
        return rows | "Records" >> beam.Map(lambda row: row[1])


class _SplitInputs(beam.DoFn):
    """A pattern to the `patterns` output, a (file, bytes) pair to the main one."""

    def process(self, element):
        if isinstance(element, str):
            yield beam.pvalue.TaggedOutput(_PATTERNS, element)
        elif isinstance(element, tuple) and len(element) == 2 and isinstance(element[1], bytes):
            yield str(element[0]), element[1]
        else:
            raise OptionError(f"ExplainImages takes file patterns (str) or (file, bytes) pairs; got "
                              f"{type(element).__name__} {str(element)[:80]!r}")


def _stem(file: str) -> str:
    """The output name stem `explain` gives a file (its name without the extension)."""
    return PurePosixPath(file).stem or "image"


class _OutputNames(beam.PTransform):
    """(file, payload) -> (file, name, payload): explain's names, unique over the whole run.

    explain gives the files of a run images.unique_names(stems) in their order: the first file of
    a stem keeps it, the next get stem_2, stem_3, ... skipping any name that is another file's
    stem. The same result without gathering every name in one place: files are grouped by stem
    (sorted by path, explain's order for a folder), each group meets the stems of the form
    <stem>_<digits> it could collide with, and unique_names runs on that group alone.
    """

    def expand(self, files):
        by_stem = files | "By stem" >> beam.Map(lambda item: (_stem(item[0]), item))
        numbered = (files | "Numbered stems" >> beam.FlatMap(_numbered_stem)
                    | "Once each" >> beam.Distinct())
        return ({"files": by_stem, "taken": numbered} | "Group" >> beam.CoGroupByKey()
                | "Unique" >> beam.FlatMap(_unique_in_group))


def _numbered_stem(item) -> Iterable[tuple[str, str]]:
    match = _NUMBERED.match(_stem(item[0]))
    if match:
        yield match.group(1), match.group(0)


def _unique_in_group(group) -> Iterable[tuple[str, str, bytes | None]]:
    stem, joined = group
    items = sorted(joined["files"], key=lambda item: item[0])
    if not items:
        return
    taken = sorted(joined["taken"])
    names = images.unique_names([stem] * len(items) + taken)[:len(items)]
    for (file, payload), name in zip(items, names):
        yield file, name, payload


class _Read(beam.DoFn):
    """(file, name, payload) -> ((file, name), bytes); read through FileSystems when no payload."""

    def process(self, element):
        file, name, payload = element
        if payload is None:
            try:
                with FileSystems.open(file, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                    payload = handle.read()
            except Exception as e:  # noqa: BLE001 - every file system raises its own types
                yield beam.pvalue.TaggedOutput(_FAILED, failed_entry(file, f"cannot read the file: {one_line(e)}"))
                return
        yield (file, name), payload


class _Render(beam.DoFn):
    """((file, name), PredictionResult) -> (csv row, record); pictures written to `out`."""

    def __init__(self, out: str, *, arrays: bool):
        self._out = out
        self._arrays = arrays

    def process(self, element):
        (file, name), prediction = element
        outcome = prediction.inference
        if not isinstance(outcome, Explanation):
            yield failed_entry(file, outcome.reason)
            return
        try:
            caption = explainer.figure_caption(labels.class_name(None, outcome.class_index), outcome.class_index,
                                               outcome.score)  # as explain captions it without --labels
            pictures = render.render_pictures(images.decode_rgb(prediction.example).numpy(), outcome.saliency,
                                              caption=caption)
        except RenderError as e:  # e.g. a NaN saliency: this image fails, the others go on
            yield failed_entry(file, f"cannot render the saliency: {e}")
            return
        written = {}
        for kind in PICTURES:
            written[kind] = f"{name}_{kind}.png"
            _write_file(FileSystems.join(self._out, written[kind]), render.encode_png(pictures[kind]))
        yield explained_entry(file, outcome.class_index, outcome.score, written)
        if self._arrays:
            yield beam.pvalue.TaggedOutput(_SALIENCY, {
                "file": file, "class": outcome.class_index, "score": outcome.score,
                "shape": list(outcome.saliency.shape),
                "saliency": np.asarray(outcome.saliency, np.float32).ravel().tolist(),
            })


def _write_file(path: str, data: bytes) -> None:
    """Write `data` to `path` whole: a local file goes through a temporary name and a rename (object
    stores publish an object only when its upload completes)."""
    if FileSystems.get_scheme(path) not in (None, "file"):
        with FileSystems.create(path, mime_type="image/png", compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)
        return
    directory, base = FileSystems.split(path)
    temporary = FileSystems.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        with FileSystems.create(temporary, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)
        FileSystems.rename([temporary], [path])
    except BaseException:
        if FileSystems.exists(temporary):
            FileSystems.delete([temporary])
        raise


class _Count(beam.DoFn):
    """Counts the rows in the Beam metrics `explained` and `failed`; passes them on."""

    def __init__(self):
        self._counters = {status: Metrics.counter(METRICS_NAMESPACE, status) for status in ("explained", "failed")}

    def process(self, row):
        self._counters[row[1]["status"]].inc()
        yield row


def _csv_line(row: list) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(row)
    return buffer.getvalue()


def _write_rows(rows, out: str) -> None:
    prefix = FileSystems.join(out, RESULTS_PREFIX)
    (rows | "JSON lines" >> beam.Map(lambda row: json.dumps(row[1]))
     | "Write JSON lines" >> beam.io.WriteToText(prefix, file_name_suffix=".jsonl"))
    (rows | "CSV lines" >> beam.Map(lambda row: _csv_line(row[0]))
     | "Write CSV" >> beam.io.WriteToText(prefix, file_name_suffix=".csv", header=",".join(CSV_COLUMNS)))


def _write_parquet(records, out: str) -> None:
    import pyarrow  # a dependency of apache-beam

    schema = pyarrow.schema([
        ("file", pyarrow.string()), ("class", pyarrow.int64()), ("score", pyarrow.float64()),
        ("shape", pyarrow.list_(pyarrow.int64())), ("saliency", pyarrow.list_(pyarrow.float32())),
    ])
    records | "Write saliency" >> beam.io.WriteToParquet(
        FileSystems.join(out, SALIENCY_PREFIX), schema, file_name_suffix=".parquet")
