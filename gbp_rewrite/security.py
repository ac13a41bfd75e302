"""Find the ops of a SavedModel that reach outside the process: files, checkpoints, the network.

A SavedModel is a program. Loading one runs its initializers, and converting one runs its
signature on a probe batch, so a model from an untrusted source could read, write or delete
files through TensorFlow ops (ReadFile, WriteFile, SaveV2, a TFRecord reader, PrintV2 to a file,
...). This module lists such ops, read from the parsed `saved_model.pb` before TensorFlow executes
anything; `convert` refuses to load a model that has them unless the caller allows it, and
`inspect` lists them.

Not reported, because every SavedModel has them and they only touch the model's own files:
  * checkpoint ops (SaveV2, RestoreV2, MergeV2Checkpoints, ...) of the standard savers: the TF1
    `saver_def` subgraph, and `__inference__traced_save_*` / `__inference__traced_restore_*`
    functions that only that saver calls;
  * a text-file lookup-table initializer whose file name is one of the model's own assets.
Everything else in the top-level graph and in *every* library function is scanned, called or not,
so an op cannot hide in a function reached through a dataset or a control-flow attr.

The op list was drawn from the op registry of TensorFlow 2.21 (every op whose kernel opens a file,
a database or a socket); tests check each name is still registered. Ops that only look file-like
are left out on purpose: DecodeCSV parses strings in memory (the CSV *readers* are CSVDataset*),
ShardedFilename only builds names, and GetSessionTensor/DeleteSessionTensor touch session state.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Collection, Mapping

from tensorflow.core.protobuf import meta_graph_pb2

from gbp_rewrite.graph import savedmodel
from gbp_rewrite.errors import UnsafeModelError
from gbp_rewrite.graph.graph_walk import node_of, saver_only_functions, saver_subgraph

_READS = "reads files"
_WRITES = "writes files"
_CHECKPOINT = "reads or writes a checkpoint"
_DATASET_READS = "reads files (tf.data)"
_DATASET_WRITES = "writes files (tf.data)"
_SUMMARY = "writes summary files"
_NETWORK = "opens network connections"

# op type -> what it does outside the process.
FILE_OPS: dict[str, str] = {
    # Plain file access.
    "ReadFile": _READS,
    "WriteFile": _WRITES,
    "MatchingFiles": "lists files",
    "ImmutableConst": "memory-maps a file",
    "FileSystemSetConfiguration": "configures a file system",
    "InitializeTableFromTextFile": _READS,
    "InitializeTableFromTextFileV2": _READS,
    "GenerateVocabRemapping": _READS,
    "RecordInput": _READS,
    # TF1 queue readers.
    "TFRecordReader": _READS,
    "TFRecordReaderV2": _READS,
    "TextLineReader": _READS,
    "TextLineReaderV2": _READS,
    "WholeFileReader": _READS,
    "WholeFileReaderV2": _READS,
    "FixedLengthRecordReader": _READS,
    "FixedLengthRecordReaderV2": _READS,
    "LMDBReader": _READS,
    # Checkpoints.
    "Save": _CHECKPOINT,
    "SaveSlices": _CHECKPOINT,
    "SaveV2": _CHECKPOINT,
    "Restore": _CHECKPOINT,
    "RestoreSlice": _CHECKPOINT,
    "RestoreV2": _CHECKPOINT,
    "MergeV2Checkpoints": _CHECKPOINT,
    "DTensorRestoreV2": _CHECKPOINT,
    "LoadAndRemapMatrix": _CHECKPOINT,
    # tf.data sources and sinks.
    "TFRecordDataset": _DATASET_READS,
    "TFRecordDatasetV2": _DATASET_READS,
    "TextLineDataset": _DATASET_READS,
    "FixedLengthRecordDataset": _DATASET_READS,
    "FixedLengthRecordDatasetV2": _DATASET_READS,
    "CSVDataset": _DATASET_READS,
    "CSVDatasetV2": _DATASET_READS,
    "ExperimentalCSVDataset": _DATASET_READS,
    "MatchingFilesDataset": _DATASET_READS,
    "ExperimentalMatchingFilesDataset": _DATASET_READS,
    "LMDBDataset": _DATASET_READS,
    "ExperimentalLMDBDataset": _DATASET_READS,
    "SqlDataset": "opens a database (tf.data)",
    "ExperimentalSqlDataset": "opens a database (tf.data)",
    "LoadDataset": _DATASET_READS,
    "SnapshotDatasetReader": _DATASET_READS,
    "SnapshotNestedDatasetReader": _DATASET_READS,
    "SnapshotChunkDataset": _DATASET_READS,
    "ListSnapshotChunksDataset": _DATASET_READS,
    "SnapshotDataset": _DATASET_WRITES,
    "SnapshotDatasetV2": _DATASET_WRITES,
    "CacheDataset": _DATASET_WRITES,
    "CacheDatasetV2": _DATASET_WRITES,
    "SaveDataset": _DATASET_WRITES,
    "SaveDatasetV2": _DATASET_WRITES,
    "DatasetToTFRecord": _DATASET_WRITES,
    "ExperimentalDatasetToTFRecord": _DATASET_WRITES,
    "DistributedSave": _DATASET_WRITES,
    # Summaries and debugging dumps.
    "CreateSummaryFileWriter": _SUMMARY,
    "CreateSummaryDbWriter": _SUMMARY,
    "WriteSummary": _SUMMARY,
    "WriteScalarSummary": _SUMMARY,
    "WriteHistogramSummary": _SUMMARY,
    "WriteImageSummary": _SUMMARY,
    "WriteAudioSummary": _SUMMARY,
    "WriteGraphSummary": _SUMMARY,
    "WriteRawProtoSummary": _SUMMARY,
    "ImportEvent": _SUMMARY,
    "FlushSummaryWriter": _SUMMARY,
    "DumpTensor": _WRITES,
    "CalibrationStatisticsSaver": _WRITES,
    "DebugIdentityV3": "writes debugger dumps",
    # The network.
    "RpcServer": _NETWORK,
    "RpcServerStart": _NETWORK,
    "RpcClient": _NETWORK,
    "RpcCall": _NETWORK,
    "DataServiceDataset": _NETWORK,
    "DataServiceDatasetV2": _NETWORK,
    "DataServiceDatasetV3": _NETWORK,
    "DataServiceDatasetV4": _NETWORK,
}

# Ops that touch files only with some attr values: op type -> (attr, test of its value, what it does).
_CONDITIONAL_OPS = {
    "PrintV2": ("output_stream", lambda v: v.s.startswith(b"file://"), _WRITES),
    "DecodeProtoV2": ("descriptor_source", lambda v: v.s not in (b"", b"local://"), _READS),
    "EncodeProto": ("descriptor_source", lambda v: v.s not in (b"", b"local://"), _READS),
    "DebugIdentity": ("debug_urls", lambda v: len(v.list.s) > 0, "writes debugger dumps"),
    "DebugIdentityV2": ("debug_urls", lambda v: len(v.list.s) > 0, "writes debugger dumps"),
    "DebugNanCount": ("debug_urls", lambda v: len(v.list.s) > 0, "writes debugger dumps"),
    "DebugNumericSummary": ("debug_urls", lambda v: len(v.list.s) > 0, "writes debugger dumps"),
}

# The op types the standard savers use; only these are exempt, and only inside the savers.
CHECKPOINT_OPS = frozenset({"Save", "SaveSlices", "SaveV2", "Restore", "RestoreSlice", "RestoreV2",
                            "MergeV2Checkpoints"})
_TEXT_FILE_INITIALIZERS = frozenset({"InitializeTableFromTextFile", "InitializeTableFromTextFileV2"})
_PASS_THROUGH = frozenset({"Identity", "Snapshot"})
_SHOWN_IN_MESSAGE = 3


@dataclasses.dataclass(frozen=True)
class FileOp:
    """One op that reaches outside the process: where it is, its type and what it does."""

    function: str  # '' = the top-level graph
    node: str
    op_type: str
    effect: str

    def describe(self) -> str:
        where = f"function {self.function}" if self.function else "the top-level graph"
        return f"{self.op_type} '{self.node}' in {where} ({self.effect})"

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def find_file_ops(meta_graph: meta_graph_pb2.MetaGraphDef) -> list[FileOp]:
    """Every file, checkpoint or network op of the meta graph outside the standard savers."""
    saver_nodes = saver_subgraph(meta_graph)
    saver_functions = saver_only_functions(meta_graph, saver_nodes)
    asset_tensors = {node_of(a.tensor_info.name) for a in meta_graph.asset_file_def}
    top_filename = {node_of(meta_graph.saver_def.filename_tensor_name)} - {""}
    found = _scan("", meta_graph.graph_def.node, asset_tensors, saver_nodes, top_filename)
    filename_args = _saver_filename_arguments(meta_graph, saver_nodes, top_filename)
    for function in meta_graph.graph_def.library.function:
        name = function.signature.name
        # Every node of a function only the saver calls is the saver's.
        in_saver = {node.name for node in function.node_def} if name in saver_functions else set()
        found.extend(_scan(name, function.node_def, _asset_arguments(meta_graph, function), in_saver,
                           filename_args.get(name, set())))
    return found


def check(file_ops: list[FileOp], *, allow: bool, source: object, action: str = "converting it") -> list[str]:
    """Raise UnsafeModelError when there are file ops and they are not allowed; `action` says
    what would run the model ("converting it", "explaining with it", ...).

    Returns the warnings to put in the conversion report when they are allowed.
    """
    if not file_ops:
        return []
    if allow:
        return [f"converted with allow_file_ops: the model's graph holds {summary(file_ops)}"]
    raise UnsafeModelError(
        f"the model '{source}' holds {summary(file_ops)}; a SavedModel is a program and {action} "
        "runs it, so gbp_rewrite refused to load it (check it with 'gbp-rewrite inspect', then "
        "pass --allow_file_ops / allow_file_ops=True if you trust it)"
    )


def check_savedmodel(path, *, allow: bool, action: str) -> None:
    """check() the SavedModel directory `path` before something loads and runs it."""
    check(find_file_ops(savedmodel.read(path).meta_graph), allow=allow, source=path, action=action)


def summary(file_ops: list[FileOp]) -> str:
    """'2 ops that reach files or the network outside the standard savers: WriteFile 'w' in ...'."""
    shown = "; ".join(op.describe() for op in file_ops[:_SHOWN_IN_MESSAGE])
    more = f"; and {len(file_ops) - _SHOWN_IN_MESSAGE} more" if len(file_ops) > _SHOWN_IN_MESSAGE else ""
    noun = "op that reaches" if len(file_ops) == 1 else "ops that reach"
    return f"{len(file_ops)} {noun} files or the network outside the standard savers: {shown}{more}"


# ---------------------------------------------------------------------------------------------


def _scan(function: str, nodes, asset_tensors: set[str], saver_nodes: Collection[str],
          saver_filename: set[str]) -> list[FileOp]:
    """The file ops of one graph (`function` '' = the top-level graph), less the checkpoint ops of
    the standard savers (`saver_nodes`) whose path is the saver's filename input (`saver_filename`:
    the node or argument names that hold it) and text-file initializers that read one of
    `asset_tensors`."""
    found = []
    by_name = None  # built at the first node that needs it: most graphs need none
    for node in nodes:
        effect = _effect(node)
        if effect is None:
            continue
        if node.op in CHECKPOINT_OPS and node.name in saver_nodes:
            by_name = by_name if by_name is not None else {n.name: n for n in nodes}
            if _paths_are_saver_filename(node, by_name, saver_filename):
                continue
        if node.op in _TEXT_FILE_INITIALIZERS:
            by_name = by_name if by_name is not None else {n.name: n for n in nodes}
            if _reads_asset(node, by_name, asset_tensors):
                continue
        found.append(FileOp(function, node.name, node.op, effect))
    return found


def _effect(node) -> str | None:
    if node.op in FILE_OPS:
        return FILE_OPS[node.op]
    conditional = _CONDITIONAL_OPS.get(node.op)
    if conditional is not None:
        attr, test, effect = conditional
        if attr in node.attr and test(node.attr[attr]):
            return effect
    return None


def _asset_arguments(meta_graph: meta_graph_pb2.MetaGraphDef, function) -> set[str]:
    """Names of the function's input args that TF2's loader binds to one of the model's assets."""
    saved = meta_graph.object_graph_def.concrete_functions.get(function.signature.name)
    if saved is None or not saved.bound_inputs:
        return set()
    args = function.signature.input_arg
    nodes = meta_graph.object_graph_def.nodes
    captured = args[len(args) - len(saved.bound_inputs):] if len(saved.bound_inputs) <= len(args) else []
    return {
        arg.name for arg, node_id in zip(captured, saved.bound_inputs)
        if 0 <= node_id < len(nodes) and nodes[node_id].WhichOneof("kind") == "asset"
    }


def _reads_asset(node, by_name: Mapping[str, object], asset_tensors: set[str]) -> bool:
    """True when the initializer's file name (input 1) comes straight from an asset tensor;
    `by_name`: the nodes of its graph."""
    if len(node.input) < 2 or not asset_tensors:
        return False
    name = node_of(node.input[1])
    for _ in range(len(by_name) + 1):  # bounded: a cyclic chain of identities is not an asset
        if name in asset_tensors:
            return True
        producer = by_name.get(name)
        if producer is None or producer.op not in _PASS_THROUGH or not producer.input:
            return False
        name = node_of(producer.input[0])
    return False


# ---------------------------------------------------------------------------------------------
# The savers' paths: a checkpoint op is the saver's only when its path is the saver's filename.

# op type -> the positions of its path inputs (a prefix, a file pattern, the merged prefixes and
# the destination).
_PATH_INPUTS = {"Save": (0,), "SaveSlices": (0,), "SaveV2": (0,), "Restore": (0,), "RestoreSlice": (0,),
                "RestoreV2": (0,), "MergeV2Checkpoints": (0, 1)}
# The suffixes TensorFlow's savers append to the filename for the temporary shards.
_SHARD_SUFFIX = re.compile(r"^(?:\.part|_temp[A-Za-z0-9_-]*/part)$")
_MAX_DEPTH = 64  # the savers' chains are a few ops long; deeper is not a saver


def _paths_are_saver_filename(node, by_name: Mapping[str, object], filename: set[str]) -> bool:
    """True when every path input of the checkpoint op `node` is built from the saver's filename
    as TensorFlow's savers build it: the filename itself (through Identity), or filename + a shard
    suffix ('.part', '_temp/part') made into shard names (StringJoin, ShardedFilename, Pack)."""
    inputs = [i for i in node.input if not i.startswith("^")]
    positions = _PATH_INPUTS.get(node.op, ())
    return bool(filename) and all(
        p < len(inputs) and _is_filename(inputs[p], by_name, filename, _MAX_DEPTH) for p in positions
    )


def _is_filename(ref: str, by_name: Mapping[str, object], filename: set[str], depth: int) -> bool:
    """True when tensor `ref` is the saver's filename or a shard name TensorFlow derives from it."""
    name = node_of(ref)
    if name in filename:
        return True
    node = by_name.get(name)
    if node is None or depth <= 0:
        return False
    inputs = [i for i in node.input if not i.startswith("^")]
    if node.op in _PASS_THROUGH or node.op == "Pack":
        return bool(inputs) and all(_is_filename(i, by_name, filename, depth - 1) for i in inputs)
    if node.op == "ShardedFilename":  # basename-SSSSS-of-NNNNN; the shard numbers are integers
        return bool(inputs) and _is_filename(inputs[0], by_name, filename, depth - 1)
    if node.op == "StringJoin":  # the filename first, then only shard suffixes
        return (len(inputs) >= 1 and not node.attr["separator"].s
                and _is_filename(inputs[0], by_name, filename, depth - 1)
                and all(_is_shard_suffix(i, by_name, depth - 1) for i in inputs[1:]))
    return False


def _is_shard_suffix(ref: str, by_name: Mapping[str, object], depth: int) -> bool:
    """True for a string constant TensorFlow's savers append (or a Select between two of them)."""
    node = by_name.get(node_of(ref))
    if node is None or depth <= 0:
        return False
    if node.op == "Const":
        values = node.attr["value"].tensor.string_val
        return len(values) == 1 and bool(_SHARD_SUFFIX.match(values[0].decode("utf-8", "replace")))
    if node.op in ("Select", "SelectV2"):  # Select(is the filename s3://..., '.part', '_temp/part')
        inputs = [i for i in node.input if not i.startswith("^")]
        return len(inputs) == 3 and all(_is_shard_suffix(i, by_name, depth - 1) for i in inputs[1:])
    return node.op in _PASS_THROUGH and bool(node.input) and _is_shard_suffix(node.input[0], by_name, depth - 1)


def _saver_filename_arguments(meta_graph, saver_nodes: set[str], top_filename: set[str]) -> dict[str, set[str]]:
    """function -> the names of its arguments that every call by the saver feeds the saver's filename.

    TF2 savers call `__inference__traced_save/restore_*(file_prefix, ...)` from the top-level graph
    with the `saver_filename` placeholder as one input; only those arguments are the filename.
    """
    top = {node.name: node for node in meta_graph.graph_def.node}
    functions = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    found: dict[str, set[str]] = {}
    for name in sorted(saver_nodes):
        node = top.get(name)
        callee = node.attr["f"].func.name if node is not None and "f" in node.attr else ""
        if callee not in functions:
            continue
        args = [a.name for a in functions[callee].signature.input_arg]
        inputs = [i for i in node.input if not i.startswith("^")]
        fed = {args[i] for i, ref in enumerate(inputs[:len(args)])
               if _is_plain_filename(ref, top, top_filename)}
        found[callee] = found[callee] & fed if callee in found else fed
    return found


def _is_plain_filename(ref: str, top: Mapping[str, object], filename: set[str]) -> bool:
    """True when `ref` is the filename itself (possibly through Identity), not a name built from it."""
    for _ in range(_MAX_DEPTH):
        if node_of(ref) in filename:
            return True
        node = top.get(node_of(ref))
        if node is None or node.op not in _PASS_THROUGH or not node.input:
            return False
        ref = node.input[0]
    return False
