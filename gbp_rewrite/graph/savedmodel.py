"""Read `saved_model.pb` and describe its signatures: the first stage of the graph path.

The source directory is only ever read (graph/staging.py patches a private copy of what is read
here; graph/lean.py tidies the export that is written).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import tensorflow as tf
from google.protobuf import message as pb_message
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from gbp_rewrite.conventions import some_names
from gbp_rewrite.errors import SignatureError, SourceModelError, one_line

SERVE_TAG = "serve"
INIT_OP_KEY = "__saved_model_init_op"


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
            keys = some_names(self.signature_keys()) or "(none)"
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
