"""The patched copy the graph path loads: gradient attrs on the chosen sites, staged beside the
source.

Patching writes a new `saved_model.pb` into a private temporary directory whose other entries
(variables/, assets/, ...) are symlinks to the source's, so a patched copy of a large model costs
one small file. The copy is for Python's loader only, so it leaves out the saver functions that
loader never calls; the self-check's view of an export (python_loader_view) is made the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from gbp_rewrite import rules, write
from gbp_rewrite.errors import SourceModelError, one_line
from gbp_rewrite.graph import folded_twin, tf1_variables
from gbp_rewrite.graph.lean import FINGERPRINT, GRADIENT_ATTR, without_saver_functions
from gbp_rewrite.graph.savedmodel import SavedModelFile

log = logging.getLogger(__name__)

# Files of the source directory that the patched copy must not share: it has its own graph, and a
# fingerprint of the original graph would describe the wrong file.
_PATCHED_FILES = ("saved_model.pb", "saved_model.pbtxt", FINGERPRINT)


def apply_gradient_attrs(meta_graph: meta_graph_pb2.MetaGraphDef, patches: dict[tuple[str, str], str]) -> None:
    """Set `_gradient_op_type` on nodes given as {(function name or '', node name): value}, and
    `_gbp_site` (rules.SITE_ATTR) to the site's key, by which the recorded gradients name it."""
    by_function: dict[str, dict[str, str]] = {}
    for (function, node), value in patches.items():
        by_function.setdefault(function, {})[node] = value
    _patch_nodes(meta_graph.graph_def.node, "", by_function.pop("", {}))
    for function in meta_graph.graph_def.library.function:
        name = function.signature.name
        _patch_nodes(function.node_def, name, by_function.pop(name, {}))
    if by_function:  # a site list from another graph: a bug, never silently ignored
        raise AssertionError(f"patches name functions that do not exist: {sorted(by_function)}")


def _patch_nodes(nodes, function: str, values: dict[str, str]) -> None:
    remaining = dict(values)
    for node in nodes:
        value = remaining.pop(node.name, None)
        if value is not None:
            node.attr[GRADIENT_ATTR].s = value.encode()
            node.attr[rules.SITE_ATTR].s = rules.site_key(function, node.name).encode()
    if remaining:
        raise AssertionError(f"patches name nodes that do not exist: {sorted(remaining)}")


@dataclasses.dataclass(frozen=True)
class PatchedCopy:
    """A patched SavedModel directory; with BatchNorms folded, the key of the folded twin signature."""

    path: Path
    folded_batchnorms: tuple[str, ...] = ()
    folded_signature: str | None = None


@contextlib.contextmanager
def patched_copy(
    model: SavedModelFile, patches: dict[tuple[str, str], str], *, fold_signature: str | None = None,
    fold_every: bool = False, also: Callable[[meta_graph_pb2.MetaGraphDef], object] | None = None,
) -> Iterator[PatchedCopy]:
    """A temporary SavedModel directory: the source with `patches` applied to its serving graph,
    TF1 reference variables made resource variables, and, with `fold_signature`, a folded twin of
    that signature (gbp_rewrite.graph.folded_twin; `fold_every`: each BatchNorm, not only where
    the size rule says it pays) beside the unchanged original. `also`, when given,
    patches the serving graph further after all that (portable gradients: every op, twin included)."""
    proto = saved_model_pb2.SavedModel()
    proto.CopyFrom(model.proto)
    meta_graph = proto.meta_graphs[model.meta_graph_index]
    apply_gradient_attrs(meta_graph, patches)
    converted = tf1_variables.convert_ref_variables(meta_graph)
    if converted:
        log.info("converted %d TF1 reference variables to resource variables", converted)
    folded = folded_twin.add_folded_twin(meta_graph, fold_signature, every=fold_every) if fold_signature else ()
    twin = folded_twin.twin_key(fold_signature) if folded else None
    if also is not None:
        also(meta_graph)
    without_saver_functions(meta_graph)  # the copy is only ever loaded by Python
    with _staged(proto, beside=model.path, prefix="gbp_rewrite_patched") as path:
        yield PatchedCopy(path, tuple(folded), twin)


@contextlib.contextmanager
def python_loader_view(export_dir: Path) -> Iterator[Path]:
    """A temporary SavedModel directory that TF2's Python loader loads like `export_dir`, faster:
    its saver functions left out (without_saver_functions), everything else shared."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    for meta_graph in proto.meta_graphs:
        without_saver_functions(meta_graph)
    with _staged(proto, beside=export_dir, prefix="gbp_rewrite_view") as path:
        yield path


@contextlib.contextmanager
def _staged(proto: saved_model_pb2.SavedModel, *, beside: Path, prefix: str) -> Iterator[Path]:
    """A temporary directory holding `proto` as saved_model.pb and symlinks to the other entries
    of the SavedModel directory `beside` (variables/, assets/, ...); removed afterwards."""
    tmp = write.temporary_directory(prefix)  # removed by the next run if we are killed
    try:
        (tmp / "saved_model.pb").write_bytes(proto.SerializeToString())
        for entry in beside.iterdir():
            if entry.name not in _PATCHED_FILES:
                os.symlink(entry.resolve(), tmp / entry.name)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _DropUnsavedGradientWarning(logging.Filter):
    """Loading a patched copy warns that its custom gradients were not saved: we register them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "unsaved custom gradients" not in record.getMessage()


def load(path: Path, *, tags: list[str] | None = None, source: Path | None = None):
    """`tf.saved_model.load` with every failure turned into a one-line SourceModelError."""
    shown = source or path
    quiet = _DropUnsavedGradientWarning()
    loggers = [logging.getLogger("absl"), logging.getLogger("tensorflow")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        return tf.saved_model.load(str(path), tags=tags)
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
        raise SourceModelError(
            f"the variables of '{shown}' are damaged or incomplete ({one_line(e)}); re-export the model"
        ) from None
    except tf.errors.NotFoundError as e:
        raise SourceModelError(
            f"'{shown}' is incomplete: {one_line(e)} (copy the whole SavedModel directory, "
            "including variables/ and assets/)"
        ) from None
    except Exception as e:  # noqa: BLE001 - TensorFlow raises many types for damaged models
        raise SourceModelError(
            f"TensorFlow cannot load '{shown}': {type(e).__name__}: {one_line(e)} (the SavedModel "
            "is damaged or inconsistent; re-export it)"
        ) from None
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
