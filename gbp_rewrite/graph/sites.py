"""Find ReLU-family ops in a SavedModel's graph and name their layers (gbp_rewrite.selection picks).

A *site* is one activation op reachable from the explained signature: a node of the top-level graph
(TF1 models) or of a library function (TF2 models), with the layer path a user knows it by:
Keras 3 exports (`functional_1/conv1_1/Relu`) mean layer `conv1`; tf-keras per-layer functions
(`__inference_conv1_layer_call_and_return_conditional_losses_42`) carry the layer in the function
name; plain name scopes otherwise; an op outside any scope is known by its own name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Iterable, Sequence

from tensorflow.core.protobuf import meta_graph_pb2

from gbp_rewrite import rules, tf_internals
from gbp_rewrite.graph import graph_walk
from gbp_rewrite.graph import lowered_activations
from gbp_rewrite.graph.savedmodel import is_keras3_export

ACTIVATION_OP_TYPES = rules.REWRITABLE_OP_TYPES + rules.REPORTED_OP_TYPES

# Ops that pass a tensor through unchanged (up to dtype), followed when looking for the op that
# really produces a signature output.
_PASS_THROUGH_OPS = frozenset({"Identity", "IdentityN", "Cast", "Snapshot", "StopGradient"})
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})

_TF_KERAS_LAYER_FUNCTION = re.compile(
    r"^__inference_(?P<layer>.+?)_layer_call_(?:and_return_conditional_losses|fn)_\d+$"
)
_SCOPE_SUFFIX = re.compile(r"^(?P<base>.+)_\d+$")


@dataclasses.dataclass(frozen=True)
class Site:
    """One activation op: where it lives (function '' = top-level graph), its type and layer path."""

    function: str
    node: str
    op_type: str
    path: tuple[str, ...]
    # The activation the op is one piece of, when that is not a ReLU activation ('hard_silu':
    # a Relu6 inside x * relu6(x + 3) / 6); such an op keeps its true gradient. '' otherwise.
    activation: str = ""
    # The output op of the smooth activation the op computes or is a piece of (swish's final Mul,
    # the op itself for a single Elu/Sigmoid/...), the op the guided extension to smooth
    # activations gates; '' when the op is no smooth activation (or its output cannot be told).
    output: str = ""
    # The IdentityN of a tf.custom_gradient over that output (Keras' swish: tf.nn.silu), ''
    # when none: with the extension it gets rules.OPS_BY_OP_GRADIENT, so the output's gate runs.
    custom_gradient: str = ""

    @property
    def layer(self) -> str:
        return self.path[-1]

    @property
    def layer_path(self) -> str:
        return "/".join(self.path)

    @property
    def key(self) -> tuple[str, str]:
        return (self.function, self.node)

    @property
    def rewritable(self) -> bool:
        return self.op_type in rules.REWRITABLE_OP_TYPES and not self.activation

    @property
    def smooth(self) -> bool:
        """A smooth activation the guided extension can rewrite (at its output op)."""
        return bool(self.output)

    @property
    def output_key(self) -> tuple[str, str]:
        """(function, node) of the op whose gradient the site's rule replaces: the output op of a
        smooth activation, the op itself otherwise."""
        return (self.function, self.output or self.node)

    @property
    def kind(self) -> str:
        """What the op computes, as a user names it: the activation, else the op type."""
        return self.activation or self.op_type



# ---------------------------------------------------------------------------------------------
# Graph walking


class _Graph:
    """Index of a meta graph: top-level nodes and library functions by name."""

    def __init__(self, meta_graph: meta_graph_pb2.MetaGraphDef):
        self.meta_graph = meta_graph
        self.top = {node.name: node for node in meta_graph.graph_def.node}
        self.functions = {f.signature.name: f for f in meta_graph.graph_def.library.function}
        self._function_nodes: dict[str, dict] = {}

    def function_nodes(self, name: str) -> dict:
        if name not in self._function_nodes:
            self._function_nodes[name] = {n.name: n for n in self.functions[name].node_def}
        return self._function_nodes[name]

    def reachable(self, tensor_names: Iterable[str]) -> tuple[set[str], list[str]]:
        """Top-level nodes the tensors depend on, and every function those nodes call (transitively)."""
        top_nodes = graph_walk.ancestors(tensor_names, self.top)
        called = [ref.name for n in sorted(top_nodes) for ref in graph_walk.func_refs(self.top[n])]
        return top_nodes, graph_walk.reachable_functions(self.functions, called)


# ---------------------------------------------------------------------------------------------
# Layer names


def known_names(meta_graph: meta_graph_pb2.MetaGraphDef) -> set[str]:
    """Layer and scope names the model states itself: variable paths, object names, Keras configs,
    and the layers tf-keras saved a call function for (weightless layers included)."""
    names: set[str] = set()
    for node in meta_graph.object_graph_def.nodes:
        kind = node.WhichOneof("kind")
        if kind == "variable":
            names.update(node.variable.name.split(":")[0].split("/")[:-1])
        elif kind == "user_object" and node.user_object.metadata:
            names.update(_names_in_keras_metadata(node.user_object.metadata))
        names.update(child.local_name for child in node.children)
    for node in meta_graph.graph_def.node:  # TF1 variables: VariableV2/VarHandleOp scopes
        if node.op in ("VariableV2", "VarHandleOp", "Variable"):
            names.update(node.name.split("/")[:-1])
    for function in meta_graph.graph_def.library.function:
        match = _TF_KERAS_LAYER_FUNCTION.match(function.signature.name)
        if match:
            names.add(match.group("layer"))
    return names


# Attributes Keras 3 layers and models track, which a saved object graph lists as children
# (tf-keras tracks neither): how a Keras 3 model saved with tf.saved_model.save is recognised.
_KERAS3_LAYER_CHILDREN = frozenset({"_inbound_nodes", "_outbound_nodes"})


def is_keras3_trace(meta_graph: meta_graph_pb2.MetaGraphDef) -> bool:
    """True when the graph's layer scopes come from Keras 3: a `model.export`, or a Keras 3 model
    inside a tf.Module saved with tf.saved_model.save."""
    if is_keras3_export(meta_graph):
        return True
    return any(
        _KERAS3_LAYER_CHILDREN <= {child.local_name for child in node.children}
        for node in meta_graph.object_graph_def.nodes
        if node.WhichOneof("kind") == "user_object"
    )


def _names_in_keras_metadata(metadata: str) -> list[str]:
    try:
        data = json.loads(metadata)
    except ValueError:
        return []
    name = data.get("name") if isinstance(data, dict) else None
    return [name] if isinstance(name, str) else []


class _LayerNamer:
    """Maps (function, node name) to the layer path a user knows."""

    def __init__(self, meta_graph: meta_graph_pb2.MetaGraphDef):
        self.known = known_names(meta_graph)
        self.keras3 = is_keras3_trace(meta_graph)

    def path(self, function: str, node_name: str) -> tuple[str, ...]:
        return layer_path(node_name, self.known, keras3=self.keras3, function=function)


def layer_path(node_name: str, known: set[str], *, keras3: bool, function: str = "") -> tuple[str, ...]:
    """The layer path of op `node_name` of `function` ('' = the top-level graph): the tf-keras layer
    a per-layer function is named after, then the op's name scopes; the op's name when it has none.

    `known` holds the layer names the model states itself; `keras3`: the names come from a Keras 3
    trace (an export, or the Keras path's own trace of a model).
    """
    match = _TF_KERAS_LAYER_FUNCTION.match(function)
    prefix = (match.group("layer"),) if match else ()
    path = prefix + tuple(_segment(s, known, keras3=keras3) for s in node_name.split("/")[:-1])
    # Scopes an activation function opens inside its layer (tf.nn.gelu's `Gelu`) are no layers:
    # the path ends at the innermost layer the model names.
    layers = [n for n, segment in enumerate(path) if segment in known]
    return (path[:layers[-1] + 1] if layers else path) or (node_name,)


def _segment(segment: str, known: set[str], *, keras3: bool) -> str:
    """The layer name of one name-scope segment: strip an `_N` suffix only where the format adds it.

    Keras 3 opens every layer call's name scope twice (once to build, once to call), so TensorFlow
    uniquifies the second, which holds the ops: layer `conv1` computes in `conv1_1`, a second
    call of it in `conv1_3`, layer `dense_1` in `dense_1_1` or `dense_1_2`. In a Keras 3 trace
    exactly one suffix is stripped. tf-keras and TF1 keep a layer's scope as its name (`dense`,
    `dense_1` are two layers); there a suffix is stripped only when the suffixed name is no
    layer the model knows and the base is one (a TF1 variable scope re-entered for shared weights).
    """
    match = _SCOPE_SUFFIX.match(segment)
    if not match:
        return segment
    base = match.group("base")
    if keras3 or (segment not in known and base in known):
        return base
    return segment


# ---------------------------------------------------------------------------------------------
# Public functions


def find_sites(meta_graph: meta_graph_pb2.MetaGraphDef, output_tensors: Sequence[str]) -> list[Site]:
    """Every activation op (ReLU family and the others reported) the given outputs depend on."""
    graph = _Graph(meta_graph)
    namer = _LayerNamer(meta_graph)
    top_nodes, functions = graph.reachable(output_tensors)
    sites = []
    if top_nodes:
        sites = activation_sites("", graph.top.values(), namer.path, only=top_nodes)
    for function in functions:
        sites.extend(activation_sites(function, graph.functions[function].node_def, namer.path))
    return sites


def activation_sites(function: str, nodes, name_path, *, only=None) -> list[Site]:
    """The activation ops among `nodes` (NodeDefs of `function`, '' = the top-level graph; `only`:
    the node names to consider, in that order), as sites named by `name_path(function, node)`."""
    nodes = list(nodes)
    composite = lowered_activations.composite_activations(nodes)
    outputs = lowered_activations.activation_outputs(nodes)
    by_name = {node.name: node for node in nodes}
    names = sorted(only) if only is not None else [node.name for node in nodes]
    found = []
    for name in names:
        node = by_name[name]
        if node.op in ACTIVATION_OP_TYPES:
            output = outputs.get(name, lowered_activations.ActivationOutput(""))
            found.append(Site(function, name, node.op, name_path(function, name), composite.get(name, ""),
                              output.node, output.custom_gradient))
    return found


# Ops that only move values (shape, dtype, which head): a squashing op before them still ends
# the output, and its pass-through gradient reaches the output unchanged.
# (Their other inputs are shapes, axes and indices.)
_SHAPE_OPS = frozenset({"Reshape", "Squeeze", "ExpandDims", "Transpose", "StridedSlice", "Slice", "GatherV2"})
_CONCAT_OPS = frozenset({"ConcatV2", "Pack"})
# Output activations whose gradient can pass straight through, making the score the logit.
SQUASHING_OP_TYPES = ("Softmax", "Sigmoid")
# Arithmetic looked through when deciding whether a squashing op hides inside the output's last ops.
_ELEMENTWISE_OPS = frozenset({
    "Add", "AddV2", "BiasAdd", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "Maximum", "Minimum",
    "ClipByValue", "Neg", "Log", "Log1p", "Exp", "Square", "Sqrt", "Pow", "Abs", "LogSoftmax",
    "Select", "SelectV2", "Mean", "Sum", "Max", "Min", "Prod", "Tile", "Unpack", "Split", "SplitV",
})


@dataclasses.dataclass(frozen=True)
class OutputHeads:
    """How an output was computed, seen from its end (through shape-only ops and concatenations).

    `ends`: the op ending each branch (a Softmax or Sigmoid to pass through, or any other op whose
    value is the score); `hidden`: a Softmax/Sigmoid found behind arithmetic at the end of a branch
    (its gradient cannot pass through: the score cannot be the logit); `lost`: a branch could not
    be traced (a function argument, a damaged graph).
    """

    ends: tuple[Site, ...]
    hidden: Site | None = None
    lost: bool = False

    @property
    def squashing(self) -> tuple[Site, ...]:
        return tuple(s for s in self.ends if s.op_type in SQUASHING_OP_TYPES)

    @property
    def squashing_keys(self) -> frozenset[tuple[str, str]]:
        """Keys of the Softmax/Sigmoid ops that end the output, or hide behind its last arithmetic:
        the output's own, never a hidden layer's activation."""
        return frozenset(s.key for s in (*self.squashing, *([self.hidden] if self.hidden else ())))

    @property
    def plain(self) -> tuple[Site, ...]:
        return tuple(s for s in self.ends if s.op_type not in SQUASHING_OP_TYPES)


def find_output_heads(meta_graph: meta_graph_pb2.MetaGraphDef, tensor_name: str) -> OutputHeads:
    """The ops that end a signature output: walks back through identities, casts, calls, reshapes,
    squeezes, expand_dims, transposes, slices and concatenations (each input a branch)."""
    graph = _Graph(meta_graph)
    ends: list[Site] = []
    lost = False
    pending = [("", tensor_name)]
    seen: set[tuple[str, str]] = set()
    while pending and len(seen) < 10_000:  # a bound against malformed, cyclic graphs
        function, ref = pending.pop()
        if (function, ref) in seen:
            continue
        seen.add((function, ref))
        step = _step_back(graph, function, ref)
        if step is None:
            lost = True
        elif isinstance(step, Site):
            if step not in ends:
                ends.append(step)
        else:
            pending.extend(reversed(step))
    if pending:
        lost = True
    hidden = None
    for end in ends:
        if end.op_type not in SQUASHING_OP_TYPES and hidden is None:
            hidden = _squashing_behind(graph, end)
    return OutputHeads(tuple(ends), hidden, lost)


def _step_back(graph: "_Graph", function: str, ref: str):
    """One step from a tensor towards its producer: the producing op as a Site when it ends the
    walk, the [(function, ref)] to follow instead, or None when the trail is lost."""
    node_name, index = _split_ref(ref, in_function=bool(function))
    nodes = graph.function_nodes(function) if function else graph.top
    node = nodes.get(node_name)
    if node is None or index < 0:
        return None
    if node.op in _CALL_OPS:
        callee = node.attr["f"].func.name
        if callee not in graph.functions:
            return None
        fdef = graph.functions[callee]
        if index >= len(fdef.signature.output_arg):
            return None
        inner = fdef.ret.get(fdef.signature.output_arg[index].name)  # .get: never add a key
        return None if inner is None else [(callee, inner)]
    inputs = [i for i in node.input if not i.startswith("^")]
    if node.op in _PASS_THROUGH_OPS or node.op in _SHAPE_OPS:
        position = index if node.op == "IdentityN" else 0
        followed = inputs[position:position + 1]
    elif node.op in _CONCAT_OPS:
        followed = inputs[:-1] if node.op == "ConcatV2" else inputs  # ConcatV2's last input is the axis
    else:
        return Site(function, node.name, node.op, (node.name,))
    if not followed or (function and any(":" not in i for i in followed)):
        return None  # a function argument: the caller's business
    return [(function, i) for i in followed]


def _squashing_behind(graph: "_Graph", end: Site) -> Site | None:
    """A Softmax/Sigmoid feeding `end` through elementwise arithmetic and shape-only ops, if any.

    Matrix products, convolutions and the like stop the search (an `end` of that kind has nothing
    behind it): a squashing op before those is a hidden layer's activation (swish, gating), not the
    output's.
    """
    if end.op_type not in _ELEMENTWISE_OPS:
        return None
    nodes = graph.function_nodes(end.function) if end.function else graph.top
    stack, seen = [end.node], set()
    while stack and len(seen) < 1_000:
        name = stack.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        node = nodes[name]
        if node.op in SQUASHING_OP_TYPES and name != end.node:
            return Site(end.function, node.name, node.op, (node.name,))
        if node.op in _ELEMENTWISE_OPS | _PASS_THROUGH_OPS | _SHAPE_OPS | _CONCAT_OPS:
            stack.extend(_split_ref(i.lstrip("^"), in_function=bool(end.function))[0]
                         for i in node.input if not i.startswith("^"))
    return None


def _split_ref(ref: str, *, in_function: bool) -> tuple[str, int]:
    """'node:0' (graph) or 'node:out_arg:0' (function body) -> (node, output index).

    A malformed index (a damaged file) gives -1, which matches no output.
    """
    parts = ref.split(":")
    index_position = 2 if in_function else 1
    index = parts[index_position] if len(parts) == index_position + 1 else "0"
    return parts[0], int(index) if index.isdigit() else -1


def op_types(meta_graph: meta_graph_pb2.MetaGraphDef, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """{(function, node): op type} of the given ops (function '' = the top-level graph)."""
    graph = _Graph(meta_graph)
    return {(f, n): (graph.function_nodes(f) if f else graph.top)[n].op for f, n in keys}


# ---------------------------------------------------------------------------------------------
# The explained output's gradient path

_MAX_PATH_STEPS = 5_000_000  # a bound against malformed graphs; beyond it, everything counts


def gradient_path(meta_graph: meta_graph_pb2.MetaGraphDef, tensor_name: str) -> set[tuple[str, str]]:
    """Keys (function, node) of the ops a gradient of `tensor_name` can flow back through.

    Walks back from the output tensor by tensor: into a called function through the output it
    returns (not the whole function, so a ReLU of another head is not on the path), back out
    through the argument it reads, and never past an op TensorFlow marks NotDifferentiable
    (StopGradient, Shape, ArgMax, ...). The gradient TensorFlow builds through a restored function
    call covers all its outputs at once, so the gradient recorder alone cannot tell the heads of a
    multi-output model apart; this walk can.
    """
    graph = _Graph(meta_graph)
    reached: set[tuple[str, str]] = set()
    seen: set[tuple] = set()
    stack: list[tuple[tuple, str, str]] = [((), "", tensor_name)]  # (callers, function, ref)
    steps = 0
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        steps += 1
        if steps > _MAX_PATH_STEPS:
            return _everything(graph)
        callers, function, ref = state
        nodes = graph.function_nodes(function) if function else graph.top
        node_name, index = _split_ref(ref, in_function=bool(function))
        if function and ":" not in ref:  # a function argument: continue at the caller's input
            stack.extend(_argument_source(graph, callers, function, ref))
            continue
        node = nodes.get(node_name)
        if node is None:
            continue
        reached.add((function, node_name))
        if _not_differentiable(node.op):
            continue
        callee = node.attr["f"].func.name if node.op in _CALL_OPS else (node.op if node.op in graph.functions else None)
        if callee is not None and callee in graph.functions:
            returned = _returned_ref(graph.functions[callee], node, ref, index, in_function=bool(function))
            if returned is not None:
                stack.append((callers + ((function, node_name),), callee, returned))
                continue
        for func_ref in graph_walk.func_refs(node):  # control flow, datasets: the whole function
            for name in graph_walk.reachable_functions(graph.functions, [func_ref.name]):
                reached.update((name, n.name) for n in graph.functions[name].node_def)
        stack.extend((callers, function, i) for i in node.input if not i.startswith("^"))
    return reached


def _argument_source(graph: _Graph, callers: tuple, function: str, arg: str) -> list[tuple[tuple, str, str]]:
    """The caller's input that feeds argument `arg` of `function`; [] at the walk's root."""
    if not callers:
        return []
    names = [a.name for a in graph.functions[function].signature.input_arg]
    if arg not in names:
        return []
    caller_function, call_node = callers[-1]
    nodes = graph.function_nodes(caller_function) if caller_function else graph.top
    inputs = [i for i in nodes[call_node].input if not i.startswith("^")]
    position = names.index(arg)
    return [(callers[:-1], caller_function, inputs[position])] if position < len(inputs) else []


def _returned_ref(fdef, node, ref: str, index: int, *, in_function: bool) -> str | None:
    """The callee's tensor a call node's output `ref` returns, or None when it cannot be told."""
    outputs = [a.name for a in fdef.signature.output_arg]
    if in_function and node.op not in _CALL_OPS:  # a direct call: 'node:<output arg>:<i>'
        parts = ref.split(":")
        position = outputs.index(parts[1]) if len(parts) == 3 and parts[1] in outputs else -1
    else:
        position = index
    if not 0 <= position < len(outputs):
        return None
    return fdef.ret.get(outputs[position])


@functools.lru_cache(maxsize=None)
def _not_differentiable(op_type: str) -> bool:
    """True for op types TensorFlow registers with no gradient (tf.no_gradient / NotDifferentiable)."""
    try:
        return tf_internals.registered_gradient(op_type) is None
    except LookupError:
        return False


def _everything(graph: _Graph) -> set[tuple[str, str]]:
    keys = {("", name) for name in graph.top}
    for name, function in graph.functions.items():
        keys.update((name, n.name) for n in function.node_def)
    return keys
