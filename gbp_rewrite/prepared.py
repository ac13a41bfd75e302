"""What the conversion pipeline (gbp_rewrite.pipeline) hands a front end, `Options`, and what it
gets back, `Prepared`.

Both front ends (gbp_rewrite.graph.front_end, gbp_rewrite.keras.front_end) build one; the pipeline
traces, writes, self-checks and reports from it alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

from gbp_rewrite.report import SiteEntry
from gbp_rewrite.serving.serving_signatures import ServingOptions
from gbp_rewrite.signatures import ExplainPlan

log = logging.getLogger("gbp_rewrite.pipeline")

Forward = Callable[[dict], Mapping]  # input tensors by key -> output tensors by key


@dataclasses.dataclass(frozen=True)
class Options:
    """The conversion options both front ends read (gbp_rewrite.convert documents each)."""

    layers: Sequence[str] | str | None
    exclude_layers: Sequence[str] | str | None
    rule: str
    signature: str
    output: str | None
    score: str
    overwrite: bool
    saliency_map: bool
    # The serving signatures and compact outputs (image bytes in, uint8/PNG maps out).
    serving: ServingOptions = ServingOptions()
    # Portable exports (gbp_rewrite.portable), SavedModel sources only: tflite/onnx imply portable.
    portable: bool = False
    tflite: Path | None = None
    onnx: Path | None = None
    cam: bool = False
    cam_layer: str | None = None
    # 'true' (default) or 'guided': the guided extension to smooth activations (guided rule only).
    smooth_activations: str = "true"


@dataclasses.dataclass
class Prepared:
    """What a front end supplies: the plan, the sites, the functions to trace and to probe."""

    source: str  # the source as the report names it
    source_format: str
    plan: ExplainPlan
    score_note: str
    score_plan: str  # the report's name for what the score is (signatures.ScorePlan.name)
    # The report's site entries, from the keys of the rule gradients built while tracing
    # (rules.record_applications): whether each site was reached is known only then.
    sites: Callable[[set[str]], list[SiteEntry]]
    owner: Any  # the object whose variables the export saves (the loaded source, or the clone)
    explained: Forward  # its gradient follows the rule: the explainable signatures are traced over it
    source_forward: Forward  # the source's own forward: the predictions the export must reproduce
    check_applied: Callable[[set[str]], str]  # proves the rule reached the gradient (rules.record_applications)
    kept_signatures: dict[str, Any] = dataclasses.field(default_factory=dict)  # copied unchanged
    checks: dict[str, str] = dataclasses.field(default_factory=dict)  # the front end's own, for the report
    warnings: list[str] = dataclasses.field(default_factory=list)
    # The probe runs in TensorFlow's C++ runtime while this thread traces in Python: on a large
    # network that hides most of the probe's time. Only for restored functions (a Keras model's
    # Python call is not run from two threads).
    probe_while_tracing: bool = False
    # Grad-CAM's options (gbp_rewrite.cam.CamOptions) for signatures.build_signatures, with --cam.
    cam: Any = None
    # More checks on the traced explainable signatures (by key), for the report.
    after_trace: list[Callable[[dict], dict[str, str]]] = dataclasses.field(default_factory=list)
    # Files written with the export and checked after its self-check: (export dir, explainable
    # signatures, probe batch) -> checks for the report.
    write_beside: Callable[[Path, dict, Mapping[str, Any]], dict[str, str]] | None = None
    # Wraps tracing and saving: TensorFlow's errors there as the front end's one-line errors.
    tensorflow_errors: Callable[[str], ContextManager] = contextlib.nullcontext


class PhaseTimer:
    """Logs how long each phase of a conversion takes (visible with --verbose)."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            log.info("%s: %.1f s", name, time.perf_counter() - started)
