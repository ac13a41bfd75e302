"""Consistency checks of a loaded source model, before its signature runs; TensorFlow's errors on
an inconsistent model turned into SourceModelError.

A damaged or hostile `saved_model.pb` can parse cleanly and still describe nonsense: a signature
whose declared dtypes or shapes disagree with the function it names, an input of unknown rank,
dimensions of 2**40. A probe batch built from such declarations can make a TensorFlow kernel abort
the whole process (the oneDNN Conv2D kernel CHECK-fails on an input of the wrong rank, and TF1
graphs are called without a shape check) or ask numpy for terabytes. So the converter

  * checks that every signature the file lists was loaded as a function (`check_loaded_signatures`:
    TF2 builds them from the object graph, which a damaged file can disagree with);
  * reconciles the signature_def's declarations with the loaded function's own input and output
    specs (`reconcile_plan`): a disagreement is a SourceModelError, an agreement gives the most
    specific shapes, and the probe is built from those;
  * refuses inputs whose rank the function itself does not fix (a probe of the rank the
    signature_def claims could abort TensorFlow), and probes or outputs too large for memory;
  * turns a TensorFlow error while tracing the explainable signatures over the source's functions,
    or while saving them, into a SourceModelError (`tensorflow_errors`): the fuzz tests show
    inconsistent function bodies and object graphs surfacing there as ValueError, TypeError or
    TensorFlow's own AssertionError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Iterator, Mapping

import tensorflow as tf

from gbp_rewrite import conventions
from gbp_rewrite.errors import GbpError, SourceModelError, one_line
from gbp_rewrite.signatures import ExplainPlan
from gbp_rewrite.graph.savedmodel import TensorDesc, shape_text
from gbp_rewrite.self_check import PROBE_BATCH

log = logging.getLogger(__name__)

# A probe batch (or one output) larger than this many elements is refused: 2**27 float32 values
# are 512 MiB, far beyond any image or feature input, and well within what a damaged dim produces.
MAX_ELEMENTS = 2**27


def reconcile_plan(plan: ExplainPlan, function, *, source: object) -> ExplainPlan:
    """`plan` with each input's and output's shape merged with the loaded function's own.

    Raises SourceModelError when they disagree, when the function leaves an input's rank open,
    or when a probe batch or an output would not fit in memory.
    """
    what = f"signature {plan.signature_key!r} of '{source}'"
    specs = _input_specs(function)
    inputs = {key: _merged(desc, specs.get(key), what, "input") for key, desc in plan.inputs.items()}
    outputs_of_function = _output_specs(function)
    outputs = {key: _merged(desc, outputs_of_function.get(key), what, "output")
               for key, desc in plan.outputs.items()}
    for key, spec in specs.items():
        if key in inputs and spec.shape.rank is None:
            # The graph takes any rank, so only the signature_def would say which: trusting it can
            # abort the process (the oneDNN Conv2D kernel CHECK-fails on a wrong rank).
            raise SourceModelError(
                f"input {key!r} of {what} has unknown rank in the model's function, so no probe "
                "batch can be built for it safely; re-export the model with a shaped input "
                "signature (e.g. tf.TensorSpec([None, 224, 224, 3]))"
            )
    for kind, descs in (("input", inputs), ("output", outputs)):
        for desc in descs.values():
            _check_size(desc, what, kind)
    return dataclasses.replace(plan, inputs=inputs, outputs=outputs)


def check_loaded_signatures(loaded, keys: list[str], *, source: object) -> None:
    """Every signature the saved_model.pb lists must exist in the loaded object as a function.

    TF2's loader builds `.signatures` from the object graph, not from the signature_def map, so in
    a damaged file the two can disagree (or `.signatures` can be some other object).
    """
    signatures = getattr(loaded, "signatures", None)
    if not isinstance(signatures, Mapping):
        raise SourceModelError(
            f"the model '{source}' loads without a signature map (its object graph is damaged); "
            "re-export the model"
        )
    for key in keys:
        if key not in signatures or not callable(signatures[key]):
            loaded_keys = ", ".join(sorted(signatures)) or "none"
            raise SourceModelError(
                f"saved_model.pb of '{source}' lists signature {key!r}, but TensorFlow loads "
                f"signatures {loaded_keys}: the file is damaged or inconsistent; re-export the model"
            )


@contextlib.contextmanager
def tensorflow_errors(doing: str, *, source: object) -> Iterator[None]:
    """Turn TensorFlow's errors while `doing` something with the source's functions into a
    SourceModelError: tracing over, or re-saving, the functions of a damaged model fails in
    TensorFlow's Python code (ValueError, TypeError, KeyError, its own AssertionErrors)."""
    try:
        yield
    except GbpError:
        raise
    except (ValueError, TypeError, LookupError, AttributeError, AssertionError, tf.errors.OpError) as e:
        log.info("%s for %s failed", doing, source, exc_info=True)  # the traceback, with --verbose
        raise SourceModelError(
            f"TensorFlow cannot {doing} for '{source}': {type(e).__name__}: {one_line(e)} (the "
            "model's functions or objects are inconsistent; re-export the model)"
        ) from None


# ---------------------------------------------------------------------------------------------


def _input_specs(function) -> Mapping[str, tf.TensorSpec]:
    try:
        args, kwargs = function.structured_input_signature
    except (TypeError, ValueError, AttributeError):
        return {}
    return kwargs if isinstance(kwargs, Mapping) else {}


def _output_specs(function) -> Mapping[str, object]:
    outputs = getattr(function, "structured_outputs", None)
    return outputs if isinstance(outputs, Mapping) else {}


def _merged(desc: TensorDesc, spec, what: str, kind: str) -> TensorDesc:
    """The declared `desc` made as specific as the function's `spec`, or a SourceModelError."""
    if desc.dtype is None:  # a composite (ragged, sparse) tensor: its TensorInfo has no dtype or shape
        if kind == "input":
            raise SourceModelError(
                f"{what} takes input {desc.key!r} as a composite (ragged or sparse) tensor; "
                "gbp_rewrite explains dense inputs only: export a signature with dense inputs"
            )
        return desc
    if spec is None or not hasattr(spec, "dtype") or not hasattr(spec, "shape"):
        raise SourceModelError(
            f"{what} declares {kind} {desc.key!r}, which its function does not have: the "
            "saved_model.pb is damaged or inconsistent; re-export the model"
        )
    if spec.dtype != desc.dtype:
        raise SourceModelError(
            f"{what} declares {kind} {desc.key!r} as {desc.dtype.name} but its function uses "
            f"{spec.dtype.name}: the saved_model.pb is damaged or inconsistent; re-export the model"
        )
    declared = tf.TensorShape(None if desc.shape is None else list(desc.shape))
    try:
        shape = declared.merge_with(spec.shape)
    except ValueError:
        raise SourceModelError(
            f"{what} declares {kind} {desc.key!r} with shape {shape_text(desc.shape)} but its function "
            f"uses {shape_text(_dims(spec.shape))}: the saved_model.pb is damaged or inconsistent; "
            "re-export the model"
        ) from None
    return dataclasses.replace(desc, dtype=spec.dtype, shape=_dims(shape))


def _dims(shape: tf.TensorShape) -> tuple[int | None, ...] | None:
    """A TensorShape as TensorDesc.shape has it: None for unknown rank."""
    return None if shape.rank is None else tuple(shape.as_list())


def _check_size(desc: TensorDesc, what: str, kind: str) -> None:
    """Refuse shapes whose probe batch (or output for it) would not fit in memory."""
    elements = math.prod(_probe_dims(desc.shape))
    if elements > MAX_ELEMENTS:
        raise SourceModelError(
            f"{kind} {desc.key!r} of {what} has shape {shape_text(desc.shape)}: "
            f"about {elements:.3g} values for a probe batch of {PROBE_BATCH}, more than the "
            f"{MAX_ELEMENTS:.3g} gbp_rewrite accepts (is a dimension damaged?)"
        )


def _probe_dims(shape: tuple[int | None, ...] | None) -> list[int]:
    """The shape of the probe batch for `shape`, as conventions.probe_value builds it (which
    self_check.probe_inputs uses), computed without allocating it."""
    if shape is None:
        return [PROBE_BATCH]
    return [(PROBE_BATCH if i == 0 else conventions.UNKNOWN_DIM) if d is None else d
            for i, d in enumerate(shape)]
