"""The export's conventions, shared with the clean verification process: names, probe, one line.

What an explainable export looks like from outside (its extra signature, input and output names,
where its report lies), how a probe batch is built and how closely predictions must match, and how
a TensorFlow error becomes one line. The converter writes by these, and `verify`'s clean process
(gbp_rewrite.deploy.clean_process) checks by them; that process runs without gbp_rewrite, so this
module imports only the standard library and numpy (TensorFlow inside functions, from the caller's
process) and the clean process loads it by file path.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import numpy as np

# The explainable export's names.
EXPLAIN_CLASS_SIGNATURE = "explain_class"
CLASS_INDEX = "class_index"
EXPLAINED_CLASS = "explained_class"
REPORT_JSON = "gbp_rewrite_report.json"
REPORT_PATH = PurePosixPath("assets") / REPORT_JSON
# The image-bytes signatures (gbp_rewrite.serving.serving_signatures) and TF Serving's warm-up file
# (gbp_rewrite.serving.warmup).
SERVING_BYTES = "serving_bytes"
EXPLAIN_CLASS_BYTES = "explain_class_bytes"
IMAGE_BYTES = "image_bytes"
IMAGE_SIZE = "image_size"
WARMUP_PATH = PurePosixPath("assets.extra") / "tf_serving_warmup_requests"

# The probe batch: floats uniform in [0, 1), integers 0, strings empty; unknown non-batch dims 32.
UNKNOWN_DIM = 32
# Forward passes of the same graph can differ in the last bits when TensorFlow fuses the
# explainable graph differently (e.g. oneDNN picks another convolution kernel).
PREDICTION_RTOL = 1e-5
PREDICTION_ATOL = 1e-6


def probe_value(spec, batch: int, rng) -> np.ndarray:
    """One input of the probe batch for a tf.TensorSpec, drawn from `rng` (np.random.Generator)."""
    if spec.shape.rank is None:
        shape = [batch]
    else:
        shape = [batch if i == 0 and d is None else (UNKNOWN_DIM if d is None else d)
                 for i, d in enumerate(spec.shape.as_list())]
    if spec.dtype.is_floating:
        return rng.random(shape).astype(spec.dtype.as_numpy_dtype)
    if spec.dtype.name == "string":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=spec.dtype.as_numpy_dtype)


# Lines of a TensorFlow error message that say nothing about the cause: the "Graph execution
# error" banner, the Python stack that defined the failing node, the node reference.
_NOISE = re.compile(r"^(Graph execution error:|Detected at node|<stack traces unavailable>|Traceback|File |\[\[)")


def one_line(error: BaseException, *, with_type: bool = False) -> str:
    """The first informative line of an exception's message (TensorFlow's run to pages), with the
    node a graph execution error was detected at; `with_type` puts the exception's type first."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    useful = [line for line in lines if not _NOISE.match(line)]
    node = next((line.split()[3] for line in lines if line.startswith("Detected at node ")), None)
    if with_type:
        message = useful[0] if useful else (lines[0] if lines else "")
        return f"{type(error).__name__}: {message}" + (f" (at node {node})" if node else "")
    message = useful[0] if useful else (lines[0] if lines else type(error).__name__)
    return message + (f" (at node {node})" if node else "")


NAMES_IN_MESSAGE = 10


def some_names(names, *, more: str = " (see inspect)") -> str:
    """At most ten names for a one-line message, then 'and N more (see inspect)'."""
    names = [str(n) for n in names]
    shown = ", ".join(names[:NAMES_IN_MESSAGE])
    hidden = len(names) - NAMES_IN_MESSAGE
    return shown + (f", and {hidden} more{more}" if hidden > 0 else "")


# Outputs closer than this, relative to their size, are equal "within float rounding".
_EQUAL_RELATIVE = 1e-5


def constant_outputs(values, *, across_examples: bool = True) -> str | None:
    """Why a model looks untrained or saturated from its explained output on a batch, or None.

    `values`: [batch] or [batch, classes]. Suspicious when every example gives all its classes the
    same value (an untrained or zeroed head), or every example gives the same values whatever its
    input (saturated units: the output no longer depends on the input). Either way the gradient is
    noise or zero. `across_examples=False` drops the second test: on random probe inputs a trained
    classifier's softmax often saturates to the same class for all of them, which proves nothing."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0 or not np.all(np.isfinite(values)):
        return None
    rows = values.reshape(values.shape[0], -1)
    tolerance = _EQUAL_RELATIVE * max(1.0, float(np.max(np.abs(rows))))
    if rows.shape[1] > 1 and np.all(np.ptp(rows, axis=1) <= tolerance):
        return f"all {rows.shape[1]} class scores are equal within float rounding for every example"
    if across_examples and rows.shape[0] > 1 and np.all(np.ptp(rows, axis=0) <= tolerance):
        return "every example gets the same scores whatever its input"
    return None


def untrained_warning(values, *, where: str, across_examples: bool = True) -> str | None:
    """The one-line warning for constant_outputs, or None."""
    why = constant_outputs(values, across_examples=across_examples)
    if why is None:
        return None
    return (f"the model looks untrained or saturated: on {where}, {why}; its saliency will be noise "
            "or zero (check that the trained weights were loaded)")
