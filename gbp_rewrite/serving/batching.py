"""A starting point for TF Serving's request batching, measured on the converted model.

`convert --serving_version` writes `batching_parameters.txt` into the model's base path, beside
the version folders, in TF Serving's text format (BatchingParameters of
tensorflow_serving/servables/tensorflow/session_bundle_config.proto). The server uses it with

    tensorflow_model_server --enable_batching --batching_parameters_file=BASE/batching_parameters.txt ...

The numbers come from timing the explainable signature at batch 1 and batch 8 in the converting
process (medians of interleaved calls): when a batch of 8 costs less than 8 single calls, batching
pays, and the suggestion allows batches up to 8 and waits at most half a single call's time to
fill one; when it does not pay, the suggestion keeps batches at 1. It is a starting point: tune
max_batch_size and batch_timeout_micros against your traffic (TF Serving's batching guide). An
existing file is left as it is (it may hold your tuning) unless the conversion overwrites.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Mapping


from gbp_rewrite import self_check
from gbp_rewrite.graph.savedmodel import TensorDesc

log = logging.getLogger(__name__)

FILE_NAME = "batching_parameters.txt"
LARGE_BATCH = 8
ROUNDS = 5
# Batching must save at least this share of the per-example time to be worth a queue.
MIN_GAIN = 0.15


def measure(function, inputs: Mapping[str, TensorDesc], *, rounds: int = ROUNDS) -> tuple[float, float]:
    """Median seconds of one call at batch 1 and at batch LARGE_BATCH (interleaved, after a warm-up)."""
    batches = {}
    for size in (1, LARGE_BATCH):
        probe = self_check.probe_inputs(inputs, batch=size)
        batches[size] = self_check.to_tensors(probe, inputs)
        function(**batches[size])  # warm-up: the first call of each shape optimises the graph
    times = {1: [], LARGE_BATCH: []}
    for _ in range(rounds):
        for size, tensors in batches.items():
            started = time.perf_counter()
            function(**tensors)
            times[size].append(time.perf_counter() - started)
    return statistics.median(times[1]), statistics.median(times[LARGE_BATCH])


def suggestion(single: float, batch: float, *, cores: int) -> str:
    """The batching_parameters.txt text for these timings (seconds per call at 1 and 8)."""
    per_example = batch / LARGE_BATCH
    gain = 1.0 - per_example / single if single > 0 else 0.0
    pays = gain >= MIN_GAIN
    max_batch = LARGE_BATCH if pays else 1
    timeout = int(round(single * 1e6 / 2)) if pays else 0
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    lines = [
        "# TF Serving batching parameters suggested by gbp_rewrite (a starting point, not a tuning).",
        "# Use: tensorflow_model_server --enable_batching --batching_parameters_file=<this file> ...",
        f"# Measured on the converting machine: {single * 1e3:.1f} ms per call at batch 1, "
        f"{batch * 1e3:.1f} ms at batch {LARGE_BATCH} ({per_example * 1e3:.1f} ms per example, "
        f"{gain:+.0%} against batch 1).",
        ("# Batching pays: batches up to 8, waiting at most half a single call to fill one."
         if pays else "# Batching does not pay on this model and machine: batches stay at 1."),
        f"max_batch_size {{ value: {max_batch} }}",
        f"batch_timeout_micros {{ value: {timeout} }}",
        f"num_batch_threads {{ value: {max(1, int(cores))} }}",
        "max_enqueued_batches { value: 100 }",
        *(f"allowed_batch_sizes: {s}" for s in sizes),
        "pad_variable_length_inputs: false",
    ]
    return "\n".join(lines) + "\n"


def measured_suggestion(function, inputs: Mapping[str, TensorDesc]) -> tuple[str, str]:
    """(file text, the report's line): the explainable signature timed at batch 1 and 8."""
    single, batch = measure(function, inputs)
    text = suggestion(single, batch, cores=os.cpu_count() or 1)
    max_batch = text.split("max_batch_size { value: ", 1)[1].split(" ", 1)[0]
    return text, (f"{FILE_NAME} suggests max_batch_size {max_batch} ({single * 1e3:.1f} ms at batch 1, "
                  f"{batch * 1e3:.1f} ms at batch {LARGE_BATCH})")


def write(base: Path, text: str, *, overwrite: bool) -> Path | None:
    """Write BASE/batching_parameters.txt atomically; an existing file is kept unless `overwrite`.
    Returns the path written, or None when an existing file was kept."""
    path = Path(base) / FILE_NAME
    if path.exists() and not overwrite:
        log.warning("kept the existing %s (convert with --overwrite to replace it with a new suggestion)", path)
        return None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s: serve with --enable_batching --batching_parameters_file=%s", path, path)
    return path
