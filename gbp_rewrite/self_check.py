"""Checks on an explainable export: the converter's self-check on a probe batch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from gbp_rewrite import conventions
from gbp_rewrite.conventions import PREDICTION_ATOL, PREDICTION_RTOL
from gbp_rewrite.errors import SourceModelError, VerificationError, one_line
from gbp_rewrite.signatures import EXPLAIN_CLASS_SIGNATURE, ExplainPlan
from gbp_rewrite.graph.savedmodel import TensorDesc
from gbp_rewrite.graph.staging import python_loader_view
from gbp_rewrite.rules import VANILLA

log = logging.getLogger(__name__)

PROBE_BATCH = 2


def probe_inputs(inputs: Mapping[str, TensorDesc], *, batch: int = PROBE_BATCH, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic batch for the inputs: floats uniform in [0, 1), integers 0, strings empty.

    The same batch as the clean-process check's (conventions.probe_value), which `verify`
    compares with the source: unknown non-batch dimensions are conventions.UNKNOWN_DIM.
    """
    rng = np.random.default_rng(seed)
    return {key: conventions.probe_value(desc.spec(), batch, rng) for key, desc in inputs.items()}


def to_tensors(arrays: Mapping[str, np.ndarray], inputs: Mapping[str, TensorDesc]) -> dict[str, tf.Tensor]:
    return {k: tf.constant(v, dtype=inputs[k].dtype) for k, v in arrays.items()}


def run_probe(
    call: Callable[[dict[str, tf.Tensor]], Mapping], plan: ExplainPlan, probe: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The source model's outputs on the probe batch (`call`: input tensors by key -> outputs by key),
    the predictions the export must reproduce; any failure is a one-line SourceModelError."""
    try:
        outputs = call(to_tensors(probe, plan.inputs))
        return {k: np.asarray(outputs[k]) for k in plan.outputs}
    except Exception as e:  # noqa: BLE001 - whatever breaks, the user needs the one line
        shapes = ", ".join(f"{k}: {list(v.shape)}" for k, v in probe.items())
        raise SourceModelError(f"the source model fails on a probe batch ({shapes}): {one_line(e)}") from None


def check_applied(selected: Sequence, reached: Sequence, rule: str) -> str:
    """Prove the rule reached the gradient: a selected op whose rule never ran for the explained
    score keeps the plain gradient, silently.

    `selected` are the selected sites (graph.sites.Site: ReLU ops, and with the guided extension
    smooth activations, `rewritable` False), `reached` those whose rule gradient ran while the
    explained score's gradient was traced (rules.record_applications), counted op by op (a smooth
    activation by its output op; the output Softmax/Sigmoid is check_pass_through's). Returns the
    check's text.
    """
    smooth = [s for s in selected if not s.rewritable]
    smooth_reached = [s for s in reached if not s.rewritable]
    relus = [s for s in selected if s.rewritable]
    relus_reached = [s for s in reached if s.rewritable]
    if rule == VANILLA:  # the true gradient needs no ReLU on the path
        return (f"{rule} rule: the plain gradient, no ReLU needed ({len(reached)} of {len(selected)} "
                "selected ReLU ops on the explained path)")
    if not reached:
        what = "ReLU ops and smooth activations" if smooth else "ReLU ops"
        raise VerificationError(
            f"none of the {len(selected)} selected {what} lies between the saliency inputs and the "
            f"explained output, so the saliency would be the plain gradient; select other layers, or "
            f"use --rule {VANILLA} for the plain gradient"
        )
    text = f"{rule} gradient built for {len(relus_reached)} of {len(relus)} selected ReLU ops"
    if smooth:
        text += (f", and the guided extension for {len(smooth_reached)} of {len(smooth)} selected smooth "
                 "activation ops (at their output op)")
    if len(reached) < len(selected):
        text += " (the others are off the explained path: no gradient of the explained score runs through them)"
    return text


def check_pass_through(heads: Sequence[tuple[str, str]], applied: set[str]) -> None:
    """Prove each output Softmax/Sigmoid (key, how to name it) passed the gradient through: one
    that kept its true gradient would explain the probability while the report says logit."""
    for key, name in heads:
        if key not in applied:
            raise VerificationError(f"the output {name} is not on the gradient path")


def self_check(
    export_dir: Path,
    *,
    plan: ExplainPlan,
    probe: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
) -> dict[str, str]:
    """Reload the export and run it on the probe batch: predictions equal, saliency finite.

    Only the explained signature runs: `explain_class` shares its traced core, and running a second
    signature would compile the whole graph again (seconds for a large network). The export is
    loaded as TensorFlow's Python loader loads it, less the saver functions that loader never
    calls (staging.python_loader_view); `gbp-rewrite verify` runs the C++ loader, which uses them.
    Returns the check results as text; raises VerificationError on a failure.
    """
    try:
        with python_loader_view(export_dir) as view:
            loaded = tf.saved_model.load(str(view))
            outputs = loaded.signatures[plan.signature_key](**to_tensors(probe, plan.inputs))
        if EXPLAIN_CLASS_SIGNATURE not in loaded.signatures:
            raise VerificationError(f"the written model has no {EXPLAIN_CLASS_SIGNATURE} signature")
    except VerificationError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to run is the finding
        raise VerificationError(f"the written model does not run on a probe batch: {one_line(e)}") from None
    checks = {}
    worst = 0.0
    for key, want in expected.items():
        got = outputs[key].numpy()
        if got.shape != want.shape or not np.allclose(got, want, rtol=PREDICTION_RTOL, atol=PREDICTION_ATOL):
            raise VerificationError(
                f"the written model's output {key!r} differs from the source model's on the probe "
                f"batch (max abs difference {_max_diff(got, want):.3g})"
            )
        worst = max(worst, _max_diff(got, want))
    checks["predictions"] = f"equal to the source model's (max abs difference {worst:.3g})"
    for key in plan.saliency_outputs:
        saliency = outputs[key].numpy()
        if saliency.shape != probe[plan.saliency_outputs[key]].shape:
            raise VerificationError(f"{key} has shape {saliency.shape}, not the input's")
        if not np.all(np.isfinite(saliency)):
            raise VerificationError(f"{key} is not finite on the probe batch (NaN or Inf)")
    checks["saliency"] = "finite, same shape and dtype as the input"
    for map_key, saliency_key in plan.saliency_maps.items():
        _check_saliency_map(map_key, outputs[map_key].numpy(), outputs[saliency_key].numpy())
    if plan.saliency_maps:
        checks["saliency map"] = "max |saliency| over channels / its per-example max"
    return checks


def _check_saliency_map(key: str, got: np.ndarray, saliency: np.ndarray) -> None:
    magnitude = np.abs(saliency.astype(np.float32)).max(axis=-1)
    peak = magnitude.max(axis=(1, 2), keepdims=True)
    want = np.divide(magnitude, peak, out=np.zeros_like(magnitude), where=peak > 0)
    if got.dtype == np.uint8:  # --saliency_map_dtype uint8: the float map as 0..255
        want, got = np.rint(want * 255), got.astype(np.float32)
        if got.shape != want.shape or np.max(np.abs(got - want), initial=0) > 1:
            raise VerificationError(f"{key} (uint8 {list(got.shape)}) is not 255 * max |saliency| over "
                                    f"channels / its per-example max (max difference {_max_diff(got, want):.3g})")
        return
    if got.dtype != np.float32 or got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=1e-7):
        raise VerificationError(
            f"{key} ({got.dtype} {list(got.shape)}) is not max |saliency| over channels scaled per "
            f"example to [0, 1] (max abs difference {_max_diff(got, want):.3g})"
        )


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape or a.size == 0:
        return float("inf") if a.shape != b.shape else 0.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
