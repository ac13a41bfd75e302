"""A folded twin of one signature inside the patched copy, so one load serves two purposes.

BatchNorm folding (gbp_rewrite.fold_batchnorm) changes the forward arithmetic by float rounding,
so the self-check must compare the explainable export with the *unfolded* source. Loading the
source a second time for that costs seconds on a large network. Instead, the patched copy gets a
private signature `__gbp_folded_<key>` whose functions are folded copies of the ones behind `<key>`
(renamed, their calls redirected to the copies); `<key>` itself and every other signature keep the
source's functions. After one load, `<key>` gives the reference predictions and the twin is traced.
"""

from __future__ import annotations

from tensorflow.core.protobuf import meta_graph_pb2

from gbp_rewrite.fold_batchnorm import fold_batchnorm

_SUFFIX = "_gbp_folded"


def twin_key(signature_key: str) -> str:
    return f"__gbp_folded_{signature_key}"


def add_folded_twin(meta_graph: meta_graph_pb2.MetaGraphDef, signature_key: str) -> tuple[str, ...]:
    """Add the folded twin of `signature_key` in place; return the folded BatchNorms (none: no twin).

    Works on TF2 SavedModels (signatures in the object graph); TF1 graphs get no twin.
    """
    sig_node_id = _signature_node(meta_graph, signature_key)
    if sig_node_id is None:
        return ()
    objects = meta_graph.object_graph_def
    wrapper = objects.nodes[sig_node_id].bare_concrete_function.concrete_function_name
    library = meta_graph.graph_def.library
    by_name = {f.signature.name: f for f in library.function}
    chain = _reachable(by_name, wrapper)
    copies = [_renamed_copy(by_name[name], chain) for name in chain]
    folded = fold_batchnorm(copies)
    if not folded:
        return ()
    library.function.extend(copies)
    objects.concrete_functions[wrapper + _SUFFIX].CopyFrom(objects.concrete_functions[wrapper])
    twin = objects.nodes.add()
    twin.CopyFrom(objects.nodes[sig_node_id])
    twin.bare_concrete_function.concrete_function_name = wrapper + _SUFFIX
    signature_map = objects.nodes[_child(objects.nodes[0], "signatures")]
    signature_map.children.add(node_id=len(objects.nodes) - 1, local_name=twin_key(signature_key))
    return tuple(folded)


def _signature_node(meta_graph, key: str) -> int | None:
    nodes = meta_graph.object_graph_def.nodes
    if not nodes:
        return None
    signature_map = _child(nodes[0], "signatures")
    if signature_map is None or signature_map >= len(nodes):
        return None
    node_id = _child(nodes[signature_map], key)
    if node_id is None or node_id >= len(nodes):
        return None
    node = nodes[node_id]
    if node.WhichOneof("kind") != "bare_concrete_function":
        return None
    name = node.bare_concrete_function.concrete_function_name
    if name not in meta_graph.object_graph_def.concrete_functions:
        return None
    return node_id


def _child(node, local_name: str) -> int | None:
    return next((c.node_id for c in node.children if c.local_name == local_name), None)


def _reachable(by_name: dict, root: str) -> list[str]:
    """`root` and every library function it calls, transitively, in discovery order."""
    found, pending = [], [root]
    while pending:
        name = pending.pop(0)
        if name in found or name not in by_name:
            continue
        found.append(name)
        for node in by_name[name].node_def:
            pending.extend(_called(node))
    return found


def _called(node) -> list[str]:
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        elif value.HasField("list"):
            names.extend(f.name for f in value.list.func)
    return names


def _renamed_copy(function, chain: list[str]):
    copy = type(function)()
    copy.CopyFrom(function)
    copy.signature.name = function.signature.name + _SUFFIX
    members = set(chain)
    for node in copy.node_def:
        for value in node.attr.values():
            if value.HasField("func") and value.func.name in members:
                value.func.name += _SUFFIX
            elif value.HasField("list"):
                for func in value.list.func:
                    if func.name in members:
                        func.name += _SUFFIX
    return copy
