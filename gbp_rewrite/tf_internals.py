"""Every private TensorFlow and Keras API gbp_rewrite uses, named with why, checked on import.

TensorFlow and Keras may move or drop any of these in a release. Each use is listed here once, so
that a new release breaks in one place with one message: which API is missing, what it is used
for, and the TensorFlow range gbp_rewrite supports (`SUPPORTED_TENSORFLOW`, the same as
pyproject.toml's bound). Importing this module checks them all (TensorFlow imports Keras itself,
so checking the Keras ones costs nothing more).

This module imports nothing from gbp_rewrite but `errors`, and falls back to RuntimeError without
it: the clean verification process (gbp_rewrite.deploy.clean_process) loads it by file path with
gbp_rewrite made unimportable.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from typing import Any

import tensorflow as tf

try:
    from gbp_rewrite.errors import UnsupportedTensorFlowError
except ImportError:  # loaded by file path in the clean verification process: no gbp_rewrite there
    UnsupportedTensorFlowError = RuntimeError  # type: ignore[misc, assignment]

# Kept equal to pyproject.toml's `tensorflow` requirement by tests/test_tf_internals.py.
SUPPORTED_TENSORFLOW = ">=2.16,<2.22"


@dataclasses.dataclass(frozen=True)
class PrivateApi:
    """One private name: the module it lives in, the attribute (a dotted path), and why we use it."""

    module: str
    attribute: str
    why: str

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}"

    def resolve(self) -> Any:
        """The object, or UnsupportedTensorFlowError naming it and the supported range."""
        try:
            value = importlib.import_module(self.module)
            for part in self.attribute.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError):
            raise missing_api_error(self.name, self.why) from None
        return value


def missing_api_error(name: str, why: str) -> Exception:
    return UnsupportedTensorFlowError(
        f"TensorFlow {tf.__version__} has no {name} (gbp_rewrite uses it to {why}); "
        f"gbp_rewrite supports tensorflow{SUPPORTED_TENSORFLOW}: install one of those versions"
    )


# ---------------------------------------------------------------------------------------------
# TensorFlow (checked on import)

GEN_NN_OPS = "tensorflow.python.ops.gen_nn_ops"
TENSORFLOW_APIS = (
    # The gradient rules are built from the fused kernels so that they keep the tensor's dtype and
    # cost one elementwise kernel (tf.raw_ops would do, but its keyword-only calls hide the math).
    PrivateApi(GEN_NN_OPS, "relu", "gate the upstream gradient in the gradient rules"),
    PrivateApi(GEN_NN_OPS, "relu_grad", "build the Relu gradient rules"),
    PrivateApi(GEN_NN_OPS, "relu6_grad", "build the Relu6 gradient rules"),
    PrivateApi(GEN_NN_OPS, "max_pool_grad", "apply a rule at the pooled resolution before a max-pool"),
    # tf.RegisterGradient raises on a second registration; asking the registry first makes
    # registering idempotent across conversions in one process.
    PrivateApi("tensorflow.python.framework.ops", "gradient_registry.lookup",
               "ask whether a gradient function is already registered, or an op not differentiable"),
    # saved_model.pb is patched after saving; the fingerprint must describe the new file. Should it
    # go, write.py's caller deletes the stale fingerprint instead (a SavedModel need not have one).
    PrivateApi("tensorflow.python.saved_model.fingerprinting_utils", "write_fingerprint",
               "rewrite fingerprint.pb after saved_model.pb is patched"),
    # The clean verification process audits ops like TF Serving's loader would.
    PrivateApi("tensorflow.python.framework.op_def_registry", "get",
               "tell custom ops from TensorFlow's own in `verify`"),
    PrivateApi("tensorflow.python.framework.kernels", "get_registered_kernels_for_op",
               "check every op of an export has a CPU kernel in `verify`"),
    # tf.Module would add a name scope and its own attributes to the saved root object.
    PrivateApi("tensorflow", "__internal__.tracking.AutoTrackable", "hold the exported signatures' root object"),
)

# The NodeDef attr TensorFlow reads to pick an op's gradient function (Graph.gradient_override_map
# sets it); the graph path sets it on the chosen ReLUs of saved_model.pb. Checked on import below.
GRADIENT_OP_TYPE_ATTR = "_gradient_op_type"

# The functions tf.saved_model.save traces for the saver_def (what C++ and TF1 loaders restore
# with): a naming convention, not an API, so no import check can see it; tests/test_security.py and
# tests/test_lean_graphs.py fail when it changes (file ops refused, saver functions kept).
STANDARD_SAVER_FUNCTION = re.compile(r"^__inference__traced_(?:save|restore)_\d+$")


def _check_gradient_attr() -> None:
    """gradient_override_map must still work by setting GRADIENT_OP_TYPE_ATTR on the NodeDef."""
    why = f"select a ReLU's gradient through the NodeDef attr {GRADIENT_OP_TYPE_ATTR!r}"
    graph = tf.Graph()
    try:
        with graph.as_default(), graph.gradient_override_map({"Relu": "Identity"}):
            op = tf.nn.relu(tf.constant([1.0])).op
        op.get_attr(GRADIENT_OP_TYPE_ATTR)
    except (AttributeError, ValueError):
        raise missing_api_error(f"the NodeDef attr {GRADIENT_OP_TYPE_ATTR!r} set by gradient_override_map", why) from None


def _check_graph_functions() -> None:
    """tf.Graph must still keep the functions it calls by name in `_get_function`, and ops their
    own gradient function in `_gradient_function` (what tf.gradients asks first)."""
    graph = tf.Graph()
    if not callable(getattr(graph, "_get_function", None)):
        raise missing_api_error("tf.Graph._get_function", "inline a restored signature's body for --cam")
    with graph.as_default():
        op = tf.constant(1.0).op
    if not hasattr(op, "_gradient_function"):
        raise missing_api_error("tf.Operation._gradient_function",
                                "keep a nested function call's gradient when --cam inlines a body")


def check_tensorflow() -> None:
    for api in TENSORFLOW_APIS:
        api.resolve()
    _check_gradient_attr()
    _check_graph_functions()


gen_nn_ops = importlib.import_module(GEN_NN_OPS)
AutoTrackable = TENSORFLOW_APIS[-1].resolve()


def registered_gradient(name: str):
    """The gradient function registered under `name` (an op type, or a tf.RegisterGradient name):
    None for an op registered as not differentiable; LookupError when nothing is registered."""
    return TENSORFLOW_APIS[4].resolve()(name)


def is_gradient_registered(name: str) -> bool:
    """Whether a gradient function is registered under `name` (tf.RegisterGradient's registry)."""
    try:
        registered_gradient(name)
    except LookupError:
        return False
    return True


def write_fingerprint(export_dir: str) -> None:
    """TensorFlow's own fingerprint.pb writer (raises whatever it raises when it fails)."""
    TENSORFLOW_APIS[5].resolve()(export_dir)


def is_registered_op(op_type: str) -> bool:
    """Whether plain TensorFlow knows `op_type` (a custom op does not)."""
    return TENSORFLOW_APIS[6].resolve()(op_type) is not None or hasattr(tf.raw_ops, op_type)


def kernel_devices(op_type: str) -> set[str]:
    """The device types with a kernel registered for `op_type` ('CPU', 'GPU', 'DEFAULT', ...)."""
    return {k.device_type for k in TENSORFLOW_APIS[7].resolve()(op_type).kernel}


def graph_function(graph: tf.Graph, name: str):
    """The function `graph` calls under `name` (a restored function's body; None if it has none).
    tf.Graph keeps no public accessor; gbp_rewrite.cam inlines a signature's body with it."""
    return graph._get_function(name)


def copy_call_gradient(source, target) -> None:
    """Give the function-call op `target` (imported from a restored body) the gradient function of
    `source`, the call op it copies.

    The SavedModel loader attaches to each restored call op its function's own gradient (which
    builds the callee's backward pass with the `_gradient_op_type` attrs honoured);
    import_graph_def does not carry it over, and tf.gradients would then fall back to
    SymbolicGradient, whose C++ gradients ignore those attrs: the rule would be lost inside.
    """
    function = getattr(source, "_gradient_function", None)
    if function is not None:
        target._gradient_function = function


# ---------------------------------------------------------------------------------------------
# Keras

KERAS_APIS = (
    # Keras 3 exports no public class for functional models; the Keras path clones only Sequential
    # and functional models (subclassed ones have no graph of layers to clone).
    PrivateApi("keras.src.models.functional", "Functional", "tell functional models from subclassed ones"),
    # Cloning rebuilds layers of a model already in this process: nothing is deserialised from
    # outside, so safe mode is lifted for the clone only, never globally.
    PrivateApi("keras.src.saving.serialization_lib", "SafeModeScope", "clone a model with Lambda layers"),
)


@dataclasses.dataclass(frozen=True)
class KerasApi:
    Functional: type
    SafeModeScope: type


@functools.cache
def keras_api() -> KerasApi:
    """The private Keras names, checked with the attributes read off Keras objects (once)."""
    functional, safe_mode_scope = (api.resolve() for api in KERAS_APIS)
    import keras  # imported here: the clean verification process never needs it

    # Named, so that Keras' automatic layer names ("lambda_1") stay the user's.
    probe = keras.layers.Lambda(lambda x: x, output_shape=(1,), name="gbp_rewrite_api_check")
    if not hasattr(probe, "_output_shape"):
        raise missing_api_error("keras.layers.Lambda._output_shape", "clone a Lambda layer with its live function")
    return KerasApi(functional, safe_mode_scope)


def lambda_output_shape(layer) -> Any:
    """The output_shape a Lambda layer was built with (Keras keeps no public accessor)."""
    return layer._output_shape


def check_all() -> None:
    """Check every private API this module names (on import, except in the clean process)."""
    check_tensorflow()
    keras_api()


if __name__ != "gbp_clean_tf_internals":  # the clean process checks only the op registries it uses
    check_all()
