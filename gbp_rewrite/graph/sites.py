"""Find ReLU-family ops in a SavedModel's graph and name their layers (gbp_rewrite.selection picks).

A *site* is one activation op reachable from the explained signature: a node of the top-level graph
(TF1 models) or of a library function (TF2 models), with the layer path a user knows it by:
Keras 3 exports (`functional_1/conv1_1/Relu`) mean layer `conv1`; tf-keras per-layer functions
(`__inference_conv1_layer_call_and_return_conditional_losses_42`) carry the layer in the function
name; plain name scopes otherwise; an op outside any scope is known by its own name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterable, Sequence

from tensorflow.core.protobuf import meta_graph_pb2

from gbp_rewrite.graph import graph_walk
from gbp_rewrite import rules
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
