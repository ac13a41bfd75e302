"""ReLU-family sites of a Keras model, and for each the layer the Keras path would rebuild.

The sites are found exactly as the graph path finds them: the model's serving call is traced once
(as `model.export` traces it) and every ReLU-family op of the trace is a site, named by its Keras
name scope (`sink_1/block_1/inner_relu6_1/Relu6` -> layer path `sink/block/inner_relu6`). So both
paths list the same sites and a layer selection means the same on both.

Each Relu/Relu6 site is then traced back to the layer object that computes it. The Keras path can
rebuild it with a rule when that layer applies a recognised ReLU activation: a layer's
`activation` (`'relu'`, `'relu6'`, `tf.nn.relu`, ...), `Activation('relu'/'relu6')`, or
`ReLU(max_value=None or k)`. The Relu6 inside `hard_sigmoid`/`hard_silu` (and MobileNetV3's
`ReLU(6.)(x + 3.) * (1. / 6.)`) is not a ReLU activation: as on the graph path
(gbp_rewrite.graph.lowered_activations), it is a site that keeps its true gradient. A ReLU computed in code the clone
cannot see into (a Lambda, a custom or wrapper layer, PReLU, a recurrent cell) is a site the Keras
path keeps, and says so; the SavedModel path rewrites every op.

With the guided extension to smooth activations, a smooth activation site (swish, GELU, mish, ELU,
SELU, softplus, sigmoid, tanh, hard_sigmoid, hard_silu: sites.Site.smooth) is rewritable when the
innermost layer around it applies one of Keras' (or TensorFlow's) functions for them as its
`activation` (`Dense(activation='gelu')`, `Activation('swish')`): the clone wraps that function
in rules.smooth_activation. Any other form (a lambda, a layer's own code) is refused by the front
end rather than left to differ from the graph path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import keras
import tensorflow as tf

from gbp_rewrite import tf_internals
from gbp_rewrite.graph import sites
from gbp_rewrite.errors import GbpError, SourceModelError, one_line
from gbp_rewrite.keras.signature import KerasSignature

Activation = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How a layer computes its ReLU: the op type and the activation rebuilt around a rule's ReLU.

    `build(relu)` returns the layer's activation with `relu` (a rule's Relu or Relu6 function) in
    place of TensorFlow's, computing the same values with the same ops as Keras does.
    """

    op_type: str
    description: str
    build: Callable[[Activation], Activation]


@dataclasses.dataclass(frozen=True)
class KerasSite:
    """A site of the traced model, the layer that computes it, and whether the clone can rewrite it."""

    site: sites.Site
    layer: Any | None  # the (original) layer object, None when the op is not inside a known layer
    lowering: Lowering | None  # None: the Keras path cannot rebuild this ReLU
    reason: str = ""  # why not, for the report
    # A smooth activation site whose layer's `activation` the clone can wrap (the guided extension).
    smooth: bool = False

    @property
    def rewritable(self) -> bool:
        return (self.site.rewritable and self.lowering is not None) or self.smooth

    @property
    def token_node(self) -> str:
        """The op the clone's activation returns for this site: the smooth activation's output (or
        the IdentityN of its custom gradient: tf.nn.silu), the ReLU op itself otherwise."""
        if not self.smooth:
            return self.site.node
        return self.site.custom_gradient or self.site.output


# ---------------------------------------------------------------------------------------------
# Recognised activations


def _same(relu: Activation) -> Activation:
    return relu


def _capped(max_value: float) -> Callable[[Activation], Activation]:
    """ReLU(max_value=k), k != 6: Keras computes relu(x) then clips to [0, k]."""

    def build(relu: Activation) -> Activation:
        def activation(x):
            y = relu(x)
            return keras.ops.clip(y, keras.ops.cast(0.0, y.dtype), keras.ops.cast(max_value, y.dtype))

        return activation

    return build


RELU = Lowering("Relu", "relu", _same)
RELU6 = Lowering("Relu6", "relu6", _same)


@functools.lru_cache(maxsize=None)
def _function_lowerings() -> dict[Any, Lowering]:
    return {
        tf.nn.relu: RELU, keras.activations.relu: RELU, keras.ops.relu: RELU,
        tf.nn.relu6: RELU6, keras.activations.relu6: RELU6, keras.ops.relu6: RELU6,
    }


def layer_lowering(layer) -> tuple[Lowering | None, str]:
    """How `layer` computes a ReLU the clone can rebuild, or (None, why not)."""
    kind = type(layer).__name__
    if isinstance(layer, keras.layers.ReLU):
        if layer.negative_slope or layer.threshold:
            return None, f"ReLU(negative_slope={layer.negative_slope}, threshold={layer.threshold}) has no guided rule"
        if layer.max_value is None:
            return RELU, ""
        if float(layer.max_value) == 6.0:
            return RELU6, ""
        return Lowering("Relu", f"relu capped at {layer.max_value}", _capped(float(layer.max_value))), ""
    # Only an `activation` set on the instance is one the layer applies itself; recurrent layers
    # expose their cell's activation as a read-only property.
    activation = vars(layer).get("activation")
    if activation is not None:
        lowering = _lookup(activation)
        if lowering is not None:
            return lowering, ""
        name = getattr(activation, "__name__", type(activation).__name__)
        return None, f"{kind} computes its ReLU in its activation {name!r}, which the Keras path does not know"
    return None, f"{kind} layer computes a ReLU in its own code"


def _lookup(function) -> Lowering | None:
    try:
        return _function_lowerings().get(function)
    except TypeError:  # an unhashable callable object
        return None


@functools.lru_cache(maxsize=None)
def _smooth_functions() -> frozenset:
    """Keras' and TensorFlow's functions for the smooth activations the guided extension covers."""
    names = ("silu", "swish", "gelu", "mish", "elu", "selu", "softplus", "sigmoid", "tanh",
             "hard_sigmoid", "hard_silu", "hard_swish")
    found = set()
    for module in (keras.activations, keras.ops, tf.nn, tf.math):
        found.update(getattr(module, name) for name in names if hasattr(module, name))
    return frozenset(found)


def is_smooth_function(function) -> bool:
    """True for a function the clone can wrap with the guided extension (rules.smooth_activation)."""
    try:
        return function in _smooth_functions()
    except TypeError:  # an unhashable callable object
        return False


def is_sigmoid_function(function) -> bool:
    try:
        return function in (keras.activations.sigmoid, keras.ops.sigmoid, tf.nn.sigmoid, tf.math.sigmoid)
    except TypeError:
        return False


def is_softmax_function(function) -> bool:
    try:
        return function in (keras.activations.softmax, keras.ops.softmax, tf.nn.softmax)
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------------
# Tracing and naming


def trace(model, signature: KerasSignature) -> tf.Graph:
    """The graph of `model`'s serving call, traced as `model.export` traces it."""
    function = tf.function(lambda inputs: signature.call(model, inputs), autograph=False)
    try:
        return function.get_concrete_function(signature.input_specs()).graph
    except GbpError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged config can build a model that cannot run
        raise SourceModelError(
            f"the Keras model '{model.name}' fails when called on its inputs: {type(e).__name__}: "
            f"{one_line(e)} (is its config damaged?)"
        ) from None


def layer_tree(model) -> dict[tuple[str, ...], Any]:
    """Every layer by path from the root model: {('sink',): model, ('sink', 'block', 'x'): layer}."""
    tree = {(model.name,): model}
    stack = [(model.name,)]
    while stack:
        path = stack.pop()
        container = tree[path]
        for layer in _sublayers(container):
            child = path + (layer.name,)
            if child not in tree:
                tree[child] = layer
                stack.append(child)
    return tree


def _sublayers(layer) -> list:
    if isinstance(layer, (tf_internals.keras_api().Functional, keras.Sequential)):
        return list(layer.layers)
    return []


def find_sites(model, signature: KerasSignature, *, graph: tf.Graph | None = None) -> list[KerasSite]:
    """Every ReLU-family op the serving call computes, with the layer that computes it
    (`graph`: the call's trace(), when the caller has it already)."""
    graph = trace(model, signature) if graph is None else graph
    tree = layer_tree(model)
    known = {name for path in tree for name in path}
    graph_def = graph.as_graph_def()
    order = {op.name: i for i, op in enumerate(graph.get_operations())}
    top = sites.activation_sites("", graph_def.node, lambda f, n: sites.layer_path(n, known, keras3=True))
    found = [_attribute(site, tree) for site in sorted(top, key=lambda site: order.get(site.node, 0))]
    for function in graph_def.library.function:  # control flow: recurrent layers
        in_function = sites.activation_sites(function.signature.name, function.node_def,
                                             lambda f, n: sites.layer_path(n, known, keras3=True))
        found.extend(KerasSite(site, None, None, "computed inside a control-flow function (a recurrent layer?)")
                     for site in in_function)
    return found


def _attribute(site: sites.Site, tree: dict[tuple[str, ...], Any]) -> KerasSite:
    layer = tree.get(site.path)
    if site.smooth:
        return _attribute_smooth(site, tree)
    if site.activation:
        return KerasSite(site, layer, None, f"part of {site.activation}, not a ReLU activation")
    if not site.rewritable:
        return KerasSite(site, layer, None, f"no guided rule for {site.op_type}")
    if layer is None or len(site.path) < 2:
        owner = _innermost_layer(site.path, tree)
        where = f"inside layer '{owner.name}' ({type(owner).__name__})" if owner is not None else "outside any layer"
        return KerasSite(site, None, None, f"computed by custom code {where}")
    if _sublayers(layer):
        return KerasSite(site, layer, None, f"computed by model '{layer.name}' itself, not by one of its layers")
    lowering, reason = layer_lowering(layer)
    if lowering is not None and lowering.op_type != site.op_type:
        return KerasSite(site, layer, None, f"a {site.op_type} op in a layer whose activation is {lowering.description}")
    return KerasSite(site, layer, lowering, reason)


def _attribute_smooth(site: sites.Site, tree: dict[tuple[str, ...], Any]) -> KerasSite:
    """A smooth activation: rewritable by the extension when the innermost layer around it (its
    ops may sit in a name scope of their own: `d_gelu/Gelu/Erfc`) applies a known function as its
    `activation`."""
    layer = tree.get(site.path)
    if layer is None:
        layer = _innermost_layer(site.path + ("",), tree)
    kind = site.activation or site.op_type
    if layer is None or _sublayers(layer):
        return KerasSite(site, None, None, f"a {kind} computed by custom code, not by a layer's activation")
    activation = vars(layer).get("activation")
    if activation is None or not is_smooth_function(activation):
        name = getattr(activation, "__name__", type(activation).__name__) if activation is not None else ""
        return KerasSite(site, layer, None, f"a {kind} computed in {type(layer).__name__} '{layer.name}' "
                         + (f"by its activation {name!r}, which the Keras path does not know" if name else
                            "by its own code"))
    return KerasSite(site, layer, None, f"no guided rule for {kind}", smooth=True)


def _innermost_layer(path: tuple[str, ...], tree: dict[tuple[str, ...], Any]):
    for end in range(len(path) - 1, 1, -1):  # a proper prefix below the root model
        if path[:end] in tree:
            return tree[path[:end]]
    return None
