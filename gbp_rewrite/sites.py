"""Find ReLU-family ops in a SavedModel's graph, name their layers, and select them.

A *site* is one activation op reachable from the explained signature: a node of the top-level graph
(TF1 models) or of a library function (TF2 models), with the layer path a user knows it by:
Keras 3 exports (`functional_1/conv1_1/Relu`) mean layer `conv1`; tf-keras per-layer functions
(`__inference_conv1_layer_call_and_return_conditional_losses_42`) carry the layer in the function
name; plain name scopes otherwise; an op outside any scope is known by its own name.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import functools
import json
import re
from typing import Iterable, Sequence

from tensorflow.core.protobuf import meta_graph_pb2

from gbp_rewrite import graph_walk, rules
from gbp_rewrite.errors import SelectionError
from gbp_rewrite.savedmodel import is_keras3_export

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
        return self.op_type in rules.REWRITABLE_OP_TYPES


OFF_PATH = "off the explained path"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The outcome of a layer selection: every site, and the ones to rewrite with why."""

    sites: tuple[Site, ...]
    selected: frozenset[tuple[str, str]]
    excluded: frozenset[tuple[str, str]]

    def status(self, site: Site, *, reached: bool = True) -> str:
        """What happened to the site's gradient: 'rewritten', 'off the explained path' (selected,
        but the explained score's gradient never runs through it, as recorded while tracing) or
        'kept: <reason>'."""
        if site.key in self.selected:
            return "rewritten" if reached else OFF_PATH
        if not site.rewritable:
            return f"kept: no guided rule for {site.op_type}"
        if site.key in self.excluded:
            return "kept: excluded"
        return "kept: not selected"

    @property
    def selected_sites(self) -> list[Site]:
        return [s for s in self.sites if s.key in self.selected]


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
    """Layer and scope names the model states itself: variable paths, object names, Keras configs."""
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
    return names


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
        self.keras3 = is_keras3_export(meta_graph)

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
    scopes = tuple(_segment(s, known, keras3=keras3) for s in node_name.split("/")[:-1])
    return (prefix + scopes) or (node_name,)


def _segment(segment: str, known: set[str], *, keras3: bool) -> str:
    """Strip Keras' `_N` scope suffix when that yields a real layer name.

    Keras 3 traces every layer call in a uniquified name scope (`conv1_1`, a second call of a
    shared layer `conv1_3`), so for its traces the suffix is stripped unless the suffixed name
    is itself a known layer. Elsewhere it is stripped only when the base is a known layer.
    """
    match = _SCOPE_SUFFIX.match(segment)
    if not match:
        return segment
    base = match.group("base")
    if base in known:
        return base
    if keras3 and segment not in known:
        return base
    return segment


# ---------------------------------------------------------------------------------------------
# Public functions


def find_sites(meta_graph: meta_graph_pb2.MetaGraphDef, output_tensors: Sequence[str]) -> list[Site]:
    """Every activation op (ReLU family and the others reported) the given outputs depend on."""
    graph = _Graph(meta_graph)
    namer = _LayerNamer(meta_graph)
    top_nodes, functions = graph.reachable(output_tensors)
    sites = [
        Site("", name, graph.top[name].op, namer.path("", name))
        for name in sorted(top_nodes)
        if graph.top[name].op in ACTIVATION_OP_TYPES
    ]
    for function in functions:
        for node in graph.functions[function].node_def:
            if node.op in ACTIVATION_OP_TYPES:
                sites.append(Site(function, node.name, node.op, namer.path(function, node.name)))
    return sites


def find_output_producer(meta_graph: meta_graph_pb2.MetaGraphDef, tensor_name: str) -> Site | None:
    """The op that computes a signature output, looking through identities, casts and calls.

    Returns it as a Site (its op type may be anything; its path is just the op's name) or None
    when the trail is lost.
    """
    graph = _Graph(meta_graph)
    function, ref = "", tensor_name
    for _ in range(10_000):  # a bound against malformed, cyclic graphs
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
            ref = fdef.ret.get(fdef.signature.output_arg[index].name)  # .get: never add a key
            if ref is None:
                return None
            function = callee
            continue
        if node.op in _PASS_THROUGH_OPS:
            inputs = [i for i in node.input if not i.startswith("^")]
            position = index if node.op == "IdentityN" else 0
            if position >= len(inputs):
                return None
            ref = inputs[position]
            if function and ":" not in ref:  # a function argument: the caller's business
                return None
            continue
        return Site(function, node.name, node.op, (node.name,))
    return None


def _split_ref(ref: str, *, in_function: bool) -> tuple[str, int]:
    """'node:0' (graph) or 'node:out_arg:0' (function body) -> (node, output index).

    A malformed index (a damaged file) gives -1, which matches no output.
    """
    parts = ref.split(":")
    index_position = 2 if in_function else 1
    index = parts[index_position] if len(parts) == index_position + 1 else "0"
    return parts[0], int(index) if index.isdigit() else -1


def layers_with_relu(sites: Iterable[Site]) -> list[str]:
    """Names of the layers that hold a rewritable ReLU, in graph order, once each."""
    return list(dict.fromkeys(s.layer_path for s in sites if s.rewritable))


def activation_summary(sites: Iterable[Site]) -> str:
    """'Relu x3, Sigmoid x1' (op types by count), or 'none'."""
    counts = collections.Counter(s.op_type for s in sites)
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())) or "none"


def _matches(site: Site, pattern: str) -> bool:
    candidates = (site.layer_path, *site.path, site.node)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def select(
    sites: Sequence[Site],
    *,
    layers: Sequence[str] | None = None,
    exclude_layers: Sequence[str] | None = None,
    rule: str = "guided",
) -> Selection:
    """Select the ReLU sites to rewrite: all, or those of the named layers, minus the excluded.

    A name or glob matches a site when it matches the layer's name, any enclosing layer (a nested
    model), the full layer path or the op name. One that matches nothing is an error listing the
    layers that hold ReLUs, and so is a selection that rewrites nothing. A model without a ReLU is
    an error naming `--rule vanilla`, except for `rule` 'vanilla' (the plain gradient needs no
    ReLU), which then selects nothing.
    """
    rewritable = [s for s in sites if s.rewritable]
    if not rewritable and not (rule == rules.VANILLA and not patterns(layers)):
        found = activation_summary(sites)
        raise SelectionError(
            f"the model has no ReLU or ReLU6 op to rewrite (activations found: {found}); the {rule} "
            f"rule only changes ReLU-family gradients; use --rule {rules.VANILLA} for the plain gradient"
        )
    if not rewritable:
        return Selection(tuple(sites), frozenset(), frozenset())
    layers = patterns(layers)
    exclude_layers = patterns(exclude_layers)
    for option, given in (("--layers", layers), ("--exclude_layers", exclude_layers)):
        for pattern in given:
            if not any(_matches(s, pattern) for s in rewritable):
                raise SelectionError(
                    f"{option} {pattern!r} matches no layer holding a ReLU; layers with ReLUs: "
                    f"{', '.join(layers_with_relu(rewritable))}"
                )
    chosen = [s for s in rewritable if not layers or any(_matches(s, p) for p in layers)]
    excluded = {s.key for s in chosen if any(_matches(s, p) for p in exclude_layers)}
    selected = {s.key for s in chosen} - excluded
    if not selected:
        raise SelectionError(
            "the layer selection rewrites nothing: every selected ReLU is excluded by "
            f"--exclude_layers {','.join(exclude_layers)}"
        )
    return Selection(tuple(sites), frozenset(selected), frozenset(excluded))


def patterns(value: Sequence[str] | str | None) -> list[str]:
    """A --layers/--exclude_layers value as a list of patterns: 'a, b*' or ['a', 'b*'] -> ['a', 'b*']."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [p.strip() for p in value if p and p.strip()]


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
    from tensorflow.python.framework import ops as tf_ops

    try:
        return tf_ops.gradient_registry.lookup(op_type) is None
    except LookupError:
        return False


def _everything(graph: _Graph) -> set[tuple[str, str]]:
    keys = {("", name) for name in graph.top}
    for name, function in graph.functions.items():
        keys.update((name, n.name) for n in function.node_def)
    return keys
