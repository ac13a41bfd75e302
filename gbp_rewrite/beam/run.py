"""`run_explain`: build and run the ExplainImages pipeline, as `gbp-rewrite explain --runner` does."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from gbp_rewrite.beam.transform import (
    METRICS_NAMESPACE,
    RESULTS_PREFIX,
    SALIENCY_PREFIX,
    ExplainImages,
)
from gbp_rewrite.errors import GbpError, ImageError, OptionError, OutputError, one_line
from gbp_rewrite.pictures import explainer, images

log = logging.getLogger(__name__)


class PipelineError(GbpError):
    """The Beam pipeline could not be built or did not finish."""


@dataclasses.dataclass
class PipelineSummary:
    """What a pipeline run did: the metrics `explained` and `failed`, where the results are."""

    runner: str
    out: str
    explained: int
    failed: int
    seconds: float

    @property
    def results(self) -> str:
        return FileSystems.join(self.out, f"{RESULTS_PREFIX}-*.csv")

    def to_text(self) -> str:
        return (f"explained {self.explained} of {self.explained + self.failed} image(s) into {self.out} "
                f"in {self.seconds:.1f} s on {self.runner} (metrics: explained {self.explained}, failed "
                f"{self.failed}; results: {self.results} and .jsonl; failed images are listed there "
                "with their reason)")


def run_explain(model: str, patterns: Sequence[str], *, out: str, runner: str = "DirectRunner",
                beam_args: Sequence[str] = (), preprocess: str = "unit", batch_size: int = 32,
                class_index: int | None = None, grayscale_to_rgb: bool = False,
                allow_file_ops: bool = False, saliency_format: str | None = None) -> PipelineSummary:
    """Explain the files matching `patterns` on a Beam runner; wait for the end; the counts.

    A local model is loaded and checked here first (an unusable model or class is an error before
    any worker starts). Result shards of an earlier run in `out` are removed first, since a run
    with another shard count would leave them beside the new ones. `beam_args` are Beam's
    pipeline options (e.g. --direct_num_workers 2, --project, --temp_location).
    """
    started = time.perf_counter()
    images.check_preprocess(preprocess)
    _check_patterns(patterns)
    if FileSystems.get_scheme(str(model)) in (None, "file"):
        explainer.check_class(explainer.load_model(model, allow_file_ops=allow_file_ops), class_index)
    _prepare_out(out)
    try:
        options = PipelineOptions(list(beam_args), runner=_local_runner(runner))
    except (ValueError, SystemExit) as e:
        raise OptionError(f"bad Beam pipeline options {' '.join(beam_args)!r}: {one_line(e)}") from None
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline | "Patterns" >> beam.Create(list(patterns))
         | "Explain images" >> ExplainImages(
             str(model), out=out, preprocess=preprocess, batch_size=batch_size, class_index=class_index,
             grayscale_to_rgb=grayscale_to_rgb, allow_file_ops=allow_file_ops, saliency_format=saliency_format))
    try:
        result = pipeline.run()
        state = result.wait_until_finish()
    except BaseException as e:
        _remove_temporaries(out)
        if isinstance(e, (GbpError, KeyboardInterrupt)) or not isinstance(e, Exception):
            raise
        raise PipelineError(f"the pipeline failed on {runner}: {one_line(e)}") from None
    if state not in (PipelineState.DONE, None):
        raise PipelineError(f"the pipeline ended in state {state} on {runner}")
    return PipelineSummary(runner, out, _counter(result, "explained"), _counter(result, "failed"),
                           time.perf_counter() - started)


def _local_runner(runner: str) -> str:
    """The runner to hand Beam: Beam's FnApiRunner for DirectRunner.

    Beam's DirectRunner first hands a batch pipeline to its Prism runner, which it downloads from
    GitHub (failing offline, after a delay) and which runs the workers as threads of this process
    (LOOPBACK), ignoring --direct_num_workers and --direct_running_mode; the FnApiRunner, where
    DirectRunner falls back to, honours them (multi_processing: one worker process each).
    """
    if runner.lower() in ("direct", "directrunner"):
        log.info("running DirectRunner's pipeline on Beam's FnApiRunner (it honours --direct_num_workers)")
        return "FnApiRunner"
    return runner


def _check_patterns(patterns: Sequence[str]) -> None:
    if not patterns:
        raise ImageError("no file patterns; pass the images with --glob 'PATTERN'")
    for pattern, result in zip(patterns, FileSystems.match(list(patterns))):
        if not result.metadata_list:
            raise ImageError(f"no files match {pattern!r}; check the pattern (quote it so the shell does "
                             "not expand it)")


def _prepare_out(out: str) -> None:
    try:
        if FileSystems.get_scheme(out) in (None, "file") and not FileSystems.exists(out):
            FileSystems.mkdirs(out)
        stale = [m.path for prefix in (RESULTS_PREFIX, SALIENCY_PREFIX)
                 for result in FileSystems.match([FileSystems.join(out, f"{prefix}-*-of-*")])
                 for m in result.metadata_list]
        if stale:
            FileSystems.delete(stale)
    except Exception as e:  # noqa: BLE001 - every file system raises its own types
        raise OutputError(f"cannot prepare the output folder '{out}': {one_line(e)}") from None


def _remove_temporaries(out: str) -> None:
    """The sinks' beam-temp-* folders of a run that did not finish."""
    try:
        found = [m.path for result in FileSystems.match([FileSystems.join(out, "beam-temp-*")])
                 for m in result.metadata_list]
        if found:
            FileSystems.delete(found)
    except Exception as e:  # noqa: BLE001 - best effort, the run's own error is the one to show
        log.warning("could not remove the temporary files in %s: %s", out, one_line(e))


def _counter(result, name: str) -> int:
    counters = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name))["counters"]
    return sum((c.committed if c.committed is not None else c.attempted) or 0 for c in counters)
