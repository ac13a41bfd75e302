"""What an export need not carry: the patch attrs, dead library functions, saver functions that
Python's loader never calls; and fingerprint.pb rewritten to match the tidied file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from gbp_rewrite import rules, tf_internals
from gbp_rewrite.graph import graph_walk

log = logging.getLogger(__name__)

GRADIENT_ATTR = tf_internals.GRADIENT_OP_TYPE_ATTR
# Attrs the patching adds (graph/staging.py); both are stripped from the export (finish_export).
PATCH_ATTRS = (GRADIENT_ATTR, rules.SITE_ATTR)
FINGERPRINT = "fingerprint.pb"


def finish_export(saved_model_pb: Path) -> None:
    """Tidy a saved_model.pb tf.saved_model.save just wrote; the fingerprint is rewritten to match.

    - Every `_gradient_op_type` and `_gbp_site` attr is removed. They name gradient functions
      registered in the converting process only: left in place, every loader would warn about
      "unsaved custom gradients". The gradients are already ordinary ops in the signatures.
    - Library functions nothing calls are removed (graph_walk.unreachable_functions): taking the
      gradient of a call leaves the original callee beside its forward/backward pair, a second
      copy of the whole forward pass that every loader would otherwise import.
    """
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(saved_model_pb.read_bytes())
    changed = False
    for meta_graph in proto.meta_graphs:
        changed |= _strip_patch_attrs(meta_graph) > 0
        changed |= drop_functions(meta_graph, graph_walk.unreachable_functions(meta_graph)) > 0
    if changed:
        saved_model_pb.write_bytes(proto.SerializeToString(deterministic=True))
        _rewrite_fingerprint(saved_model_pb.parent)


def _strip_patch_attrs(meta_graph: meta_graph_pb2.MetaGraphDef) -> int:
    """Remove the attrs apply_gradient_attrs set; return how many."""
    removed = 0
    nodes = list(meta_graph.graph_def.node)
    for function in meta_graph.graph_def.library.function:
        nodes.extend(function.node_def)
    for node in nodes:
        for attr in PATCH_ATTRS:
            if attr in node.attr:
                del node.attr[attr]
                removed += 1
    return removed


def drop_functions(meta_graph: meta_graph_pb2.MetaGraphDef, names: set[str]) -> int:
    """Remove the library functions `names` (and their gradient entries); return how many."""
    library = meta_graph.graph_def.library
    kept = [f for f in library.function if f.signature.name not in names]
    dropped = len(library.function) - len(kept)
    if dropped:
        del library.function[:]
        library.function.extend(kept)
        gradients = [g for g in library.gradient if g.function_name not in names]
        del library.gradient[:]
        library.gradient.extend(gradients)
    return dropped


def without_saver_functions(meta_graph: meta_graph_pb2.MetaGraphDef) -> int:
    """Drop the standard saver functions from a TF2 SavedModel's graph meant for Python's loader
    only; return how many. That loader restores variables from the checkpoint itself and never
    calls them, but it would import them (a third of a ResNet50's graph). TF1 SavedModels
    (no object graph) are left alone: Python loads those through the saver."""
    if not meta_graph.object_graph_def.nodes:
        return 0
    saver = graph_walk.saver_only_functions(meta_graph, graph_walk.saver_subgraph(meta_graph))
    return drop_functions(meta_graph, saver)


def _rewrite_fingerprint(export_dir: Path) -> None:
    """Recompute fingerprint.pb after saved_model.pb changed: its checksum describes the old file.

    Uses TensorFlow's own writer (tf_internals); should it fail, the stale fingerprint is deleted
    instead: a SavedModel need not have one (TensorFlow before 2.12 wrote none).
    """
    try:
        tf_internals.write_fingerprint(str(export_dir))
    except Exception as e:  # noqa: BLE001 - any failure: a missing fingerprint beats a wrong one
        log.info("cannot rewrite the fingerprint of %s (%s); deleting it", export_dir, e)
        (export_dir / FINGERPRINT).unlink(missing_ok=True)
