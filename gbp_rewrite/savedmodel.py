"""Read `saved_model.pb`, describe its signatures, patch gradient attrs, load a patched copy,
tidy the written export.

The source directory is only ever read. Patching writes a new `saved_model.pb` into a private
temporary directory whose other entries (variables/, assets/, ...) are symlinks to the source's,
so a patched copy of a large model costs one small file. The copy is for Python's loader only, so
it leaves out the saver functions that loader never calls; the self-check's view of an export
(python_loader_view) is made the same way.
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
from google.protobuf import message as pb_message
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from gbp_rewrite import export, folded_twin, graph_walk, rules, tf1_variables
from gbp_rewrite.errors import SignatureError, SourceModelError, one_line

log = logging.getLogger(__name__)

SERVE_TAG = "serve"
INIT_OP_KEY = "__saved_model_init_op"
GRADIENT_ATTR = "_gradient_op_type"
# Attrs the patching adds; both are stripped from the export (finish_export).
_PATCH_ATTRS = (GRADIENT_ATTR, rules.SITE_ATTR)

# Files of the source directory that the patched copy must not share: it has its own graph, and a
# fingerprint of the original graph would describe the wrong file.
_FINGERPRINT = "fingerprint.pb"
_PATCHED_FILES = ("saved_model.pb", "saved_model.pbtxt", _FINGERPRINT)


@dataclasses.dataclass(frozen=True)
class TensorDesc:
    """One signature input or output: its key, tensor name, dtype and shape (None = unknown)."""

    key: str
    tensor_name: str
    dtype: tf.DType
    shape: tuple[int | None, ...] | None

    def spec(self) -> tf.TensorSpec:
        return tf.TensorSpec(self.shape, self.dtype, name=self.key)

    def describe(self) -> str:
        dtype = self.dtype.name if self.dtype is not None else "composite (ragged or sparse)"
        return f"{self.key}: {dtype} {shape_text(self.shape)}"


@dataclasses.dataclass(frozen=True)
class SignatureDesc:
    key: str
    inputs: dict[str, TensorDesc]
    outputs: dict[str, TensorDesc]


@dataclasses.dataclass
class SavedModelFile:
    """A parsed SavedModel directory and the meta graph this tool works on (the 'serve' one)."""

    path: Path
    proto: saved_model_pb2.SavedModel
    meta_graph_index: int

    @property
    def meta_graph(self) -> meta_graph_pb2.MetaGraphDef:
        return self.proto.meta_graphs[self.meta_graph_index]

    @property
    def tags(self) -> list[str]:
        return list(self.meta_graph.meta_info_def.tags)

    @property
    def format(self) -> str:
        """A short name for the kind of SavedModel: how it was most likely written."""
        meta_graph = self.meta_graph
        if not meta_graph.object_graph_def.nodes:
            return "tf1"
        if (self.path / "keras_metadata.pb").exists() or any(
            node.user_object.identifier.startswith("_tf_keras")
            for node in meta_graph.object_graph_def.nodes
        ):
            return "tf-keras"
        if is_keras3_export(meta_graph):
            return "keras3-export"
        return "tf2"

    def signature_keys(self) -> list[str]:
        return sorted(k for k in self.meta_graph.signature_def if k != INIT_OP_KEY)

    def signature(self, key: str) -> SignatureDesc:
        """Describe signature `key`, or raise a SignatureError listing the keys there are."""
        defs = self.meta_graph.signature_def
        if key not in defs or key == INIT_OP_KEY:
            keys = ", ".join(self.signature_keys()) or "(none)"
            raise SignatureError(
                f"the model in '{self.path}' has no signature {key!r}; its signatures: {keys} "
                "(choose one with --signature)"
            )
        sig = defs[key]
        _check_tensor_names(self.path, key, sig, self.meta_graph.graph_def)
        return SignatureDesc(
            key=key,
            inputs={k: _tensor_desc(k, v) for k, v in sorted(sig.inputs.items())},
            outputs={k: _tensor_desc(k, v) for k, v in sorted(sig.outputs.items())},
        )


def is_keras3_export(meta_graph: meta_graph_pb2.MetaGraphDef) -> bool:
    """True for SavedModels written by Keras 3's `model.export` (its ExportArchive)."""
    nodes = meta_graph.object_graph_def.nodes
    if not nodes:
        return False
    root_children = {child.local_name for child in nodes[0].children}
    return {"_all_variables", "_misc_assets"} <= root_children


def read(path: str | os.PathLike) -> SavedModelFile:
    """Parse the SavedModel at `path`; every failure is a one-line SourceModelError."""
    path = Path(path)
    if not path.exists():
        raise SourceModelError(f"no such file or directory: '{path}'")
    if not path.is_dir():
        raise SourceModelError(
            f"'{path}' is a file, not a SavedModel directory (Keras models: pass a .keras or .h5 "
            "file, or a directory written by model.export or tf.saved_model.save)"
        )
    proto = _parse(path)
    if not proto.meta_graphs:
        raise SourceModelError(
            f"saved_model.pb in '{path}' holds no meta graph: it is truncated or empty; re-export the model"
        )
    return SavedModelFile(path=path, proto=proto, meta_graph_index=_serving_meta_graph(path, proto))


def _parse(path: Path) -> saved_model_pb2.SavedModel:
    proto = saved_model_pb2.SavedModel()
    binary, text = path / "saved_model.pb", path / "saved_model.pbtxt"
    try:
        if binary.is_file():
            proto.ParseFromString(binary.read_bytes())
        elif text.is_file():
            text_format.Parse(text.read_text(encoding="utf-8"), proto)
        else:
            raise SourceModelError(
                f"'{path}' has no saved_model.pb: it is not a SavedModel directory (write one with "
                "tf.saved_model.save or Keras' model.export)"
            )
    except (pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError, RuntimeWarning) as e:
        raise SourceModelError(
            f"saved_model.pb in '{path}' is corrupt or truncated ({one_line(e)}); re-export the model"
        ) from None
    except OSError as e:
        raise SourceModelError(f"cannot read '{path}': {one_line(e)}") from None
    return proto


def _serving_meta_graph(path: Path, proto: saved_model_pb2.SavedModel) -> int:
    for index, meta_graph in enumerate(proto.meta_graphs):
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return index
    if len(proto.meta_graphs) == 1:
        return 0
    tag_sets = "; ".join(",".join(mg.meta_info_def.tags) for mg in proto.meta_graphs)
    raise SourceModelError(
        f"the SavedModel in '{path}' has several meta graphs and none is tagged 'serve' "
        f"(tag sets: {tag_sets}); re-export it with the 'serve' tag"
    )


def _tensor_desc(key: str, info: meta_graph_pb2.TensorInfo) -> TensorDesc:
    try:
        dtype = tf.dtypes.as_dtype(info.dtype)
    except TypeError:
        if info.WhichOneof("encoding") != "composite_tensor":  # a ragged/sparse tensor has no dtype
            raise SourceModelError(
                f"signature tensor {key!r} ('{info.name}') has data type number {info.dtype}, which "
                "TensorFlow does not know: saved_model.pb is damaged; re-export the model"
            ) from None
        dtype = None
    if info.tensor_shape.unknown_rank:
        shape = None
    else:
        shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
    return TensorDesc(key=key, tensor_name=info.name, dtype=dtype, shape=shape)


def _check_tensor_names(path: Path, key: str, sig: meta_graph_pb2.SignatureDef, graph_def) -> None:
    """Each signature tensor must name a node of the graph (a damaged file may name anything)."""
    nodes = {node.name for node in graph_def.node}
    for kind, infos in (("input", sig.inputs), ("output", sig.outputs)):
        for tensor_key, info in sorted(infos.items()):
            if info.WhichOneof("encoding") != "name":  # composite tensors list their components
                continue
            node, _, index = info.name.partition(":")
            if node not in nodes or not (index == "" or index.isdigit()):
                raise SourceModelError(
                    f"signature {key!r} of '{path}' has {kind} {tensor_key!r} = tensor "
                    f"'{info.name}', which is not in the graph: saved_model.pb is damaged; "
                    "re-export the model"
                )


def shape_text(shape: tuple[int | None, ...] | None) -> str:
    """'[?, 8, 8, 3]' (None: an unknown dimension), or 'unknown rank' for shape None."""
    if shape is None:
        return "unknown rank"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


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
        changed |= _drop_functions(meta_graph, graph_walk.unreachable_functions(meta_graph)) > 0
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
        for attr in _PATCH_ATTRS:
            if attr in node.attr:
                del node.attr[attr]
                removed += 1
    return removed


def _drop_functions(meta_graph: meta_graph_pb2.MetaGraphDef, names: set[str]) -> int:
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
    return _drop_functions(meta_graph, saver)


def _rewrite_fingerprint(export_dir: Path) -> None:
    """Recompute fingerprint.pb after saved_model.pb changed: its checksum describes the old file.

    Uses TensorFlow's own writer; should that fail (a private API that may move), the stale
    fingerprint is deleted instead: a SavedModel need not have one (TensorFlow before 2.12 wrote none).
    """
    try:
        # Imported here: a private module; should it move, the fallback below still applies.
        from tensorflow.python.saved_model import fingerprinting_utils

        fingerprinting_utils.write_fingerprint(str(export_dir))
    except Exception as e:  # noqa: BLE001 - any failure: a missing fingerprint beats a wrong one
        log.info("cannot rewrite the fingerprint of %s (%s); deleting it", export_dir, e)
        (export_dir / _FINGERPRINT).unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class PatchedCopy:
    """A patched SavedModel directory; with BatchNorms folded, the key of the folded twin signature."""

    path: Path
    folded_batchnorms: tuple[str, ...] = ()
    folded_signature: str | None = None


@contextlib.contextmanager
def patched_copy(
    model: SavedModelFile, patches: dict[tuple[str, str], str], *, fold_signature: str | None = None,
    also: Callable[[meta_graph_pb2.MetaGraphDef], object] | None = None,
) -> Iterator[PatchedCopy]:
    """A temporary SavedModel directory: the source with `patches` applied to its serving graph,
    TF1 reference variables made resource variables, and, with `fold_signature`, a folded twin of
    that signature (gbp_rewrite.folded_twin) beside the unchanged original. `also`, when given,
    patches the serving graph further after all that (portable gradients: every op, twin included)."""
    proto = saved_model_pb2.SavedModel()
    proto.CopyFrom(model.proto)
    meta_graph = proto.meta_graphs[model.meta_graph_index]
    apply_gradient_attrs(meta_graph, patches)
    converted = tf1_variables.convert_ref_variables(meta_graph)
    if converted:
        log.info("converted %d TF1 reference variables to resource variables", converted)
    folded = folded_twin.add_folded_twin(meta_graph, fold_signature) if fold_signature else ()
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
    tmp = export.temporary_directory(prefix)  # removed by the next run if we are killed
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
