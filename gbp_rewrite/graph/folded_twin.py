"""A folded twin of one signature inside the patched copy, so one load serves two purposes.

BatchNorm folding (gbp_rewrite.graph.fold_batchnorm) changes the forward arithmetic by float rounding,
so the self-check must compare the explainable export with the *unfolded* source. Loading the
source a second time for that costs seconds on a large network. Instead, the patched copy gets a
private signature `__gbp_folded_<key>` whose functions are folded copies of the ones behind `<key>`
(renamed, their calls redirected to the copies); `<key>` itself and every other signature keep the
source's functions. After one load, `<key>` gives the reference predictions and the twin is traced.
"""

from __future__ import annotations

import logging

from tensorflow.core.protobuf import meta_graph_pb2

from gbp_rewrite.graph import graph_walk
from gbp_rewrite.graph.fold_batchnorm import fold_batchnorm

log = logging.getLogger(__name__)

_SUFFIX = "_gbp_folded"


def twin_key(signature_key: str) -> str:
    return f"__gbp_folded_{signature_key}"


def add_folded_twin(meta_graph: meta_graph_pb2.MetaGraphDef, signature_key: str, *,
                    every: bool = False) -> tuple[str, ...]:
    """Add the folded twin of `signature_key` in place; return the folded BatchNorms (none: no twin).
    `every`: fold each BatchNorm, also where the size rule would not (fold_batchnorm).

    Works on TF2 SavedModels (signatures in the object graph); TF1 graphs get no twin.
    """
    sig_node_id = _signature_node(meta_graph, signature_key)
    if sig_node_id is None:
        return ()
    objects = meta_graph.object_graph_def
    wrapper = objects.nodes[sig_node_id].bare_concrete_function.concrete_function_name
    library = meta_graph.graph_def.library
    by_name = {f.signature.name: f for f in library.function}
    chain = graph_walk.reachable_functions(by_name, [wrapper])
    if _has_saved_custom_gradient(library, [by_name[name] for name in chain]):
        # The restored gradient function of a saved tf.custom_gradient (tf.nn.silu: Keras' swish)
        # is bound to the original function's tensors; the twin's gradient cannot call it.
        log.info("BatchNorms not folded: signature %r has saved custom gradients", signature_key)
        return ()
    members = set(chain)
    copies = [_renamed_copy(by_name[name], members) for name in chain]
    folded = fold_batchnorm(copies, every=every)
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


def _has_saved_custom_gradient(library, functions) -> bool:
    """True when a node of `functions` uses a gradient saved with the model (tf.custom_gradient)."""
    saved = {g.registered_op_type for g in library.registered_gradients}
    return any(node.attr["_gradient_op_type"].s.decode() in saved
               for function in functions for node in function.node_def if "_gradient_op_type" in node.attr)


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


def _renamed_copy(function, members: set[str]):
    """A copy of `function` under the twin's name, its calls of `members` redirected to their copies."""
    copy = type(function)()
    copy.CopyFrom(function)
    copy.signature.name = function.signature.name + _SUFFIX
    for node in copy.node_def:
        for ref in graph_walk.func_refs(node):
            if ref.name in members:
                ref.name += _SUFFIX
    return copy
