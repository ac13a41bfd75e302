"""Walking GraphDefs and FunctionDefs: tensor references, ancestors, called functions, the saver.

Shared by the modules that read a SavedModel's graph (sites, security, folded_twin, fold_batchnorm,
tf1_variables, savedmodel); it imports nothing from gbp_rewrite but tf_internals (a leaf), so any of
them can use it.
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator, Mapping

from gbp_rewrite import tf_internals


def node_of(ref: str) -> str:
    """'^node' (control input), 'node:0' (graph) or 'node:out:0' (function body) -> 'node'."""
    return ref.lstrip("^").split(":")[0]


def output_index(ref: str) -> int:
    """The output index of a function-body tensor reference 'node:out:i' (0 for 'node')."""
    parts = ref.split(":")
    return int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else 0


def func_refs(node) -> Iterator:
    """The function references (NameAttrList messages) in a NodeDef's attrs: a call's `f`, a
    control-flow op's branches and bodies, a dataset's functions. Reading `.name` gives the called
    function; setting it redirects the call."""
    for value in node.attr.values():
        if value.HasField("func"):
            yield value.func
        elif value.HasField("list"):
            yield from value.list.func


def ancestors(roots: Iterable[str], nodes_by_name: Mapping[str, object]) -> set[str]:
    """Names of the nodes the tensor references `roots` depend on, control inputs included
    (the nodes themselves too); references to unknown nodes are ignored."""
    seen: set[str] = set()
    stack = [node_of(ref) for ref in roots]
    while stack:
        name = stack.pop()
        if name in seen or name not in nodes_by_name:
            continue
        seen.add(name)
        stack.extend(node_of(ref) for ref in nodes_by_name[name].input)
    return seen


def reachable_functions(by_name: Mapping[str, object], roots: Iterable[str]) -> list[str]:
    """The functions named in `roots` and every library function they call, transitively, in
    breadth-first discovery order; `by_name` maps function names to FunctionDefs, and names it
    lacks (calls of missing functions) are left out."""
    found: list[str] = []
    seen: set[str] = set()
    pending = collections.deque(roots)
    while pending:
        name = pending.popleft()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        found.append(name)
        for node in by_name[name].node_def:
            pending.extend(ref.name for ref in func_refs(node))
    return found


# The functions tf.saved_model.save traces for the saver_def (what C++ and TF1 loaders restore with).
_STANDARD_SAVER_FUNCTION = tf_internals.STANDARD_SAVER_FUNCTION


def saver_subgraph(meta_graph) -> set[str]:
    """Top-level nodes the saver_def's save tensor and restore op depend on."""
    saver = meta_graph.saver_def
    roots = [name for name in (saver.save_tensor_name, saver.restore_op_name) if name]
    return ancestors(roots, {node.name: node for node in meta_graph.graph_def.node})


def object_graph_functions(meta_graph) -> set[str]:
    """The functions TF2's Python loader may call directly: those the object graph names."""
    names = set(meta_graph.object_graph_def.concrete_functions)
    for node in meta_graph.object_graph_def.nodes:
        if node.WhichOneof("kind") == "function":
            names.update(node.function.concrete_functions)
        elif node.WhichOneof("kind") == "bare_concrete_function":
            names.add(node.bare_concrete_function.concrete_function_name)
    return names


def saver_only_functions(meta_graph, saver_nodes: set[str]) -> set[str]:
    """Standard `__inference__traced_save/restore_*` functions called by the saver (`saver_nodes`,
    from saver_subgraph) and nothing else.

    A function of that name that a signature, an initializer or another function also calls is
    not exempt: a model could name its own function like the standard one.
    """
    called_by_saver: set[str] = set()
    called_elsewhere = object_graph_functions(meta_graph)
    for node in meta_graph.graph_def.node:
        target = called_by_saver if node.name in saver_nodes else called_elsewhere
        target.update(ref.name for ref in func_refs(node))
    for function in meta_graph.graph_def.library.function:
        for node in function.node_def:
            called_elsewhere.update(ref.name for ref in func_refs(node))
    return {name for name in called_by_saver - called_elsewhere if _STANDARD_SAVER_FUNCTION.match(name)}


def unreachable_functions(meta_graph) -> set[str]:
    """Library functions nothing can call: not the top-level graph, not the object graph, not a
    reachable function. Kept anyway: functions with an `api_implements` attr, which Grappler's
    implementation selector may swap in for a sibling (e.g. an LSTM's cuDNN variant)."""
    by_name = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    roots = object_graph_functions(meta_graph)
    for node in meta_graph.graph_def.node:
        roots.update(ref.name for ref in func_refs(node))
    reachable = set(reachable_functions(by_name, sorted(roots)))
    return {name for name, function in by_name.items()
            if name not in reachable and "api_implements" not in function.attr}
