"""Portable exports: mark every op of a patched copy with its portable gradient, check that the
traced signature uses only ops TFLite builtins and ONNX both run, write the .tflite and .onnx
files, and run each in its own runtime on the probe batch.

The .onnx is post-processed so that each kernel is stored once: initializers that are a permutation
of another become Transpose nodes of it, and the gradients' run-time zeros are bypassed (onnxruntime
folds the re-layouts at load).

The files are written to hidden temporary siblings and renamed into place only when the whole
conversion (the SavedModel included) succeeded: a failure leaves no partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import itertools
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from gbp_rewrite import rules
from gbp_rewrite.graph.lean import GRADIENT_ATTR
from gbp_rewrite.errors import OptionError, OutputError, VerificationError, one_line
from gbp_rewrite.portable import gradients

log = logging.getLogger(__name__)

# Op types (forward and backward) that both TFLite's builtins and ONNX (through tf2onnx) convert,
# plus the graph plumbing every converter removes (calls are inlined, variables frozen).
ALLOWED_OP_TYPES = frozenset({
    # plumbing
    "Const", "Identity", "IdentityN", "Placeholder", "NoOp", "ReadVariableOp", "VarHandleOp",
    "PartitionedCall", "StatefulPartitionedCall", "StopGradient", "Snapshot",
    # neural network
    "Conv2D", "Conv2DBackpropInput", "DepthwiseConv2dNative", "MaxPool", "AvgPool", "MatMul",
    "BatchMatMulV2", "BiasAdd", "Relu", "Relu6", "Softmax", "Sigmoid", "Tanh", "DepthToSpace",
    "SpaceToDepth", "LeakyRelu", "SpaceToBatchND", "BatchToSpaceND",
    # arithmetic and comparison
    "AddV2", "Add", "AddN", "Sub", "Mul", "RealDiv", "Neg", "Abs", "Square", "Sqrt", "Rsqrt", "Exp",
    "Log", "Maximum", "Minimum", "Greater", "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual",
    "LogicalAnd", "LogicalOr", "LogicalNot", "Select", "SelectV2", "Cast", "Floor",
    # reductions and indexing
    "Mean", "Sum", "Max", "Min", "Prod", "ArgMax", "OneHot", "GatherV2",
    # shapes
    "Reshape", "Shape", "Squeeze", "ExpandDims", "ConcatV2", "Pack", "Unpack", "Split", "SplitV",
    "StridedSlice", "Slice", "Pad", "PadV2", "Transpose", "ReverseV2", "Fill", "ZerosLike",
    "OnesLike", "Tile", "BroadcastTo", "Range",
})

ONNX_OPSET = 17
FILE_RTOL = 1e-5  # predictions and saliency of each file against the TensorFlow export
# Kink flips (see _compare): TensorFlow's own outputs at inputs nudged by this relative amount
# (the size of the runtimes' own rounding differences in activations, ~1e-6) bound what a
# runtime may differ by; KINK_NUDGES such inputs, drawn with a fixed seed.
KINK_NUDGE = 1e-6
KINK_NUDGES = 8

_EXTRAS = {  # file kind -> (module the check imports, the extra that installs it)
    "tflite": ("ai_edge_litert.interpreter", "tflite"),
    "onnx": ("tf2onnx", "onnx"),
}


def require_extras(*, tflite: bool, onnx: bool) -> None:
    """A one-line OptionError naming the extra when a requested file's converter is missing."""
    wanted = [kind for kind, asked in (("tflite", tflite), ("onnx", onnx)) if asked]
    modules = {"tflite": ["ai_edge_litert.interpreter"], "onnx": ["tf2onnx", "onnx", "onnxruntime"]}
    for kind in wanted:
        for module in modules[kind]:
            try:
                importlib.import_module(module)
            except ImportError:
                raise OptionError(
                    f"--{kind} needs the optional extra '{kind}' ({module} is not installed): "
                    f"pip install -e '.[{kind}]'"
                ) from None


# ---------------------------------------------------------------------------------------------
# Patching and the op check


def mark_portable_gradients(meta_graph: meta_graph_pb2.MetaGraphDef) -> int:
    """Give every op of a covered type that has no gradient attr yet its portable gradient
    (ReLUs not selected for the rule: the true gradient, portably); return how many."""
    marked = 0
    nodes = list(meta_graph.graph_def.node)
    for function in meta_graph.graph_def.library.function:
        nodes.extend(function.node_def)
    for node in nodes:
        if GRADIENT_ATTR in node.attr:
            continue
        if node.op in rules.REWRITABLE_OP_TYPES:
            node.attr[GRADIENT_ATTR].s = gradients.relu_gradient_op_type("vanilla", node.op).encode()
        elif node.op in gradients.GRADIENTS:
            node.attr[GRADIENT_ATTR].s = gradients.gradient_op_type(node.op).encode()
        else:
            continue
        marked += 1
    return marked


def check_ops(function, *, layer_of: Callable[[str], str]) -> str:
    """Raise a one-line PortableGradientError naming the first op of the traced `function` (and
    its nested functions) outside ALLOWED_OP_TYPES, with its layer; else describe the op types."""
    graph_def = function.graph.as_graph_def()
    nodes = [(node, "") for node in graph_def.node]
    for fdef in graph_def.library.function:
        nodes.extend((node, fdef.signature.name) for node in fdef.node_def)
    used = {node.op for node, _ in nodes}
    for node, _ in nodes:
        if node.op not in ALLOWED_OP_TYPES:
            forward = _forward_op_name(node.name)
            part = "the gradient of" if forward != node.name else "the forward op"
            raise gradients.PortableGradientError(
                f"op {node.op} ('{node.name}', {part} '{forward}' in layer '{layer_of(forward)}') has no "
                f"TFLite builtin or ONNX equivalent; portable gradients cover {_covered()}. Convert "
                "without --portable/--tflite/--onnx (the regular export runs in TensorFlow and TF Serving)"
            )
    return f"{len(used)} op types, all TFLite builtins and ONNX ops ({len(nodes)} nodes)"


def _covered() -> str:
    names = sorted(gradients.COVERED_OP_TYPES)
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


_GRADIENT_NAME = re.compile(r"^(?:.*?/)?gradients(?:_\d+)?/(?P<forward>.+?)_grad/")


def _forward_op_name(node_name: str) -> str:
    """'gradients/functional_1/conv1_1/Conv2D_grad/X' -> 'functional_1/conv1_1/Conv2D'."""
    match = _GRADIENT_NAME.match(node_name)
    return match.group("forward") if match else node_name


# ---------------------------------------------------------------------------------------------
# The files


@dataclasses.dataclass
class StagedFiles:
    """Where the portable files go, and the hidden temporary siblings they are written to first."""

    targets: dict[str, Path]
    temporary: dict[str, Path]


@contextlib.contextmanager
def staged_files(*, tflite: str | os.PathLike | None, onnx: str | os.PathLike | None,
                 overwrite: bool) -> Iterator[StagedFiles]:
    """Temporary names for the requested files, renamed into place when the block succeeds and
    removed when it fails."""
    targets = {kind: Path(path) for kind, path in (("tflite", tflite), ("onnx", onnx)) if path is not None}
    for kind, target in targets.items():
        if target.is_dir():
            raise OutputError(f"--{kind} '{target}' is a directory; give a file name")
        if target.exists() and not overwrite:
            raise OutputError(f"--{kind} '{target}' exists; pass --overwrite to replace it")
        if not target.parent.is_dir():
            raise OutputError(f"--{kind} '{target}': the folder '{target.parent}' does not exist")
    temporary = {kind: t.with_name(f".{t.name}.gbp-tmp-{os.getpid()}") for kind, t in targets.items()}
    try:
        yield StagedFiles(targets, temporary)
    except BaseException:
        for path in temporary.values():
            path.unlink(missing_ok=True)
        raise
    for kind, path in temporary.items():
        os.replace(path, targets[kind])


def write_and_check(export_dir: Path, staged: StagedFiles, *, signature: str, probe: Mapping[str, np.ndarray],
                    expected: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Write each staged file from the export at `export_dir`, run it on `probe` in its runtime and
    compare every output with `expected` (the TensorFlow export's, see _compare); return the check
    results."""
    checks = {}
    nudged = NudgedReference(export_dir, signature=signature, probe=probe)
    writers = {"tflite": write_tflite, "onnx": write_onnx}
    for kind, path in staged.temporary.items():
        writers[kind](export_dir, signature, path)
        checks[kind] = check_file(kind, path, signature=signature, probe=probe, expected=expected, nudged=nudged)
    return checks


RUNTIMES = {"tflite": "LiteRT", "onnx": "onnxruntime"}  # file kind -> the runtime that runs it


def check_file(kind: str, path: Path, *, signature: str, probe: Mapping[str, np.ndarray],
               expected: Mapping[str, np.ndarray], nudged: NudgedReference) -> str:
    """Run the `kind` ("tflite" or "onnx") file at `path` on `probe` in its runtime and compare
    every output with `expected`, the TensorFlow export's on the same inputs (and, for an example
    beyond 1e-5, with `nudged`'s runs: see _compare): the conversion's self-check and `verify`'s.
    Returns what passed; a VerificationError says what did not."""
    got = run_tflite(path, signature, probe) if kind == "tflite" else run_onnx(path, probe)
    return _compare(RUNTIMES[kind], got, expected, path, nudged)


def tflite_signatures(path: Path) -> list[str]:
    """The signature keys of a .tflite file (a VerificationError when LiteRT cannot read it)."""
    from ai_edge_litert import interpreter

    try:
        return list(interpreter.Interpreter(model_path=str(path)).get_signature_list())
    except Exception as e:  # noqa: BLE001 - LiteRT raises RuntimeError/ValueError
        raise VerificationError(f"LiteRT cannot read '{path}': {one_line(e)}") from None


def onnx_input_names(path: Path) -> list[str]:
    """The input names of an .onnx file (a VerificationError when onnxruntime cannot read it)."""
    try:
        session = _onnx_session(path)
        return [i.name for i in session.get_inputs()]
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors
        raise VerificationError(f"onnxruntime cannot read '{path}': {one_line(e)}") from None


def write_tflite(export_dir: Path, signature: str, path: Path) -> None:
    """The export's `signature` as a .tflite file of TFLite builtins only (no Flex ops)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(export_dir), signature_keys=[signature])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        path.write_bytes(converter.convert())
    except Exception as e:  # noqa: BLE001 - the converter raises its own error types
        raise VerificationError(f"the TFLite converter refused the portable export: {_converter_reason(e)}") from None


def _converter_reason(error: BaseException) -> str:
    text = str(error)
    ops = re.search(r"(?:ops? that can be supported by the flex runtime|not supported)[^\n]*?:?\s*\n?\s*(.*)", text)
    return one_line(error) if ops is None else one_line(error) + " " + ops.group(1)[:200]


class _UnsupportedOps(logging.Handler):
    """Collects tf2onnx's log lines about ops it left unconverted (its exit status says nothing)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "not supported" in message or "Unsupported ops" in message:
            self.lines.append(message)


def write_onnx(export_dir: Path, signature: str, path: Path) -> None:
    """The export's `signature` as an ONNX file (opset ONNX_OPSET), refused when tf2onnx leaves an
    op unconverted or onnx.checker finds the model invalid."""
    import onnx
    import tf2onnx

    loaded = tf.saved_model.load(str(export_dir))
    function = loaded.signatures[signature]
    _, specs = function.structured_input_signature
    keys = sorted(specs)

    @tf.function(autograph=False)
    def call(*args):
        return function(**dict(zip(keys, args)))

    input_signature = [tf.TensorSpec(specs[k].shape, specs[k].dtype, name=k) for k in keys]
    unsupported = _UnsupportedOps()
    tf2onnx_log = logging.getLogger("tf2onnx")
    tf2onnx_log.addHandler(unsupported)
    try:
        model, _ = tf2onnx.convert.from_function(call, input_signature=input_signature, opset=ONNX_OPSET)
    except Exception as e:  # noqa: BLE001 - tf2onnx raises many types
        raise VerificationError(f"tf2onnx cannot convert the portable export: {one_line(e)}") from None
    finally:
        tf2onnx_log.removeHandler(unsupported)
    if unsupported.lines:
        raise VerificationError(f"tf2onnx left ops unconverted in the ONNX model: {unsupported.lines[-1]}")
    _shorten_names(model)
    dropped = drop_runtime_zeros(model)
    shared = share_transposed_initializers(model)
    if dropped:
        log.info("ONNX: %d run-time zeros dropped (onnxruntime folds the kernels' re-layouts at load)", dropped)
    if shared:
        log.info("ONNX: %d folded kernel copies replaced by Transpose nodes of the stored kernels", shared)
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - onnx.checker's ValidationError and friends
        raise VerificationError(f"onnx.checker rejects the converted model: {one_line(e)}") from None
    path.write_bytes(model.SerializeToString())


# The call wrappers tf2onnx keeps in every name ("StatefulPartitionedCall/PartitionedCall/...").
_CALL_PREFIXES = re.compile(r"(?:(?:Stateful)?PartitionedCall(?:_\d+)?(?:_grad)?/)+")


def _shorten_names(model) -> None:
    """Drop the call-wrapper prefixes from the names of nodes and inner values (a third of a small
    model's file); the graph's input and output names stay as they are, and so does any name
    whose short form is taken."""
    graph = model.graph
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output}
    values = {name for node in graph.node for name in [*node.input, *node.output] if name}
    values |= {t.name for t in graph.initializer}
    renamed, taken = {}, set(fixed) | values
    for name in sorted(values - fixed):
        short = _CALL_PREFIXES.sub("", name)
        if short != name and short not in taken:
            renamed[name] = short
            taken.add(short)
    for node in graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for info in graph.value_info:
        info.name = renamed.get(info.name, info.name)
    node_names = {node.name for node in graph.node}
    for node in graph.node:
        short = _CALL_PREFIXES.sub("", node.name)
        if short != node.name and short not in node_names:
            node_names.add(short)
            node.name = short


def drop_runtime_zeros(model) -> int:
    """Bypass each `x + zero` whose zero is the portable gradients' run-time one (`Cast(Less(m, m))`,
    made in the gradients module); return how many.

    That zero keeps TFLite's converter from storing re-laid-out kernel copies; in ONNX the copies
    are shared by share_transposed_initializers instead, and without the zero the re-layouts
    depend on initializers only, so onnxruntime folds them at session start and runs the backward
    convolutions with constant (prepacked) weights."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}

    def is_zero(name: str) -> bool:
        cast = producer.get(name)
        less = producer.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
        return less is not None and less.op_type == "Less" and less.input[0] == less.input[1]

    bypass = {}
    for node in graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and node.output[0] not in {o.name for o in graph.output}:
            for keep, zero in ((0, 1), (1, 0)):
                if is_zero(node.input[zero]):
                    bypass[node.output[0]] = node.input[keep]
                    break
    if not bypass:
        return 0

    def resolve(name: str) -> str:
        while name in bypass:
            name = bypass[name]
        return name

    for node in graph.node:
        node.input[:] = [resolve(n) for n in node.input]
    _remove_unused_nodes(graph)
    return len(bypass)


def _remove_unused_nodes(graph) -> None:
    """Drop nodes none of whose outputs is used (repeatedly: a dropped node frees its inputs)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        kept = [node for node in graph.node if any(out in used for out in node.output)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


# Smaller initializers are left alone: a Transpose node would cost about as much as the bytes saved.
_SHARE_MIN_ELEMENTS = 1024


def share_transposed_initializers(model) -> int:
    """Replace each initializer that is an axis permutation of another, bit for bit, by a Transpose
    node of that other one; return how many.

    tf2onnx folds the re-laid-out kernels of the portable gradients (TFLite's [out, kh, kw, in]
    layout, from which they are derived at run time) into second copies next to the forward op's
    own. onnxruntime folds the Transpose nodes back at session start: the file keeps one copy, the
    run pays nothing."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    candidates: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for tensor in graph.initializer:
        if math.prod(tensor.dims) < _SHARE_MIN_ELEMENTS or len(tensor.dims) > 6:
            continue
        array = numpy_helper.to_array(tensor)
        # Same dtype, same multiset of dimensions and the same sorted bytes: a permutation may relate them.
        key = (array.dtype.str, tuple(sorted(array.shape)), hashlib.sha256(np.sort(array, axis=None).tobytes()).digest())
        candidates.setdefault(key, []).append((tensor.name, array))
    replaced: dict[str, tuple[str, tuple[int, ...]]] = {}
    for group in candidates.values():
        kept: list[tuple[str, np.ndarray]] = []
        for name, array in group:
            match = next(((k, perm) for k, a in kept if (perm := _permutation(a, array)) is not None), None)
            if match is None:
                kept.append((name, array))
            else:
                replaced[name] = match
    if not replaced:
        return 0
    keep = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = [onnx.helper.make_node("Transpose", [source], [name], name=f"{name}/shared_transpose", perm=list(perm))
             for name, (source, perm) in replaced.items()]
    for index, node in enumerate(nodes):
        graph.node.insert(index, node)
    return len(replaced)


def _permutation(source: np.ndarray, target: np.ndarray) -> tuple[int, ...] | None:
    """The axis permutation p with source.transpose(p) equal to target bit for bit, if any."""
    wanted = target.tobytes()
    for perm in itertools.permutations(range(source.ndim)):
        if tuple(source.shape[a] for a in perm) == target.shape and np.ascontiguousarray(source.transpose(perm)).tobytes() == wanted:
            return perm
    return None


def run_tflite(path: Path, signature: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`inputs` through the .tflite file's signature in LiteRT (ai_edge_litert)."""
    from ai_edge_litert import interpreter

    try:
        runner = interpreter.Interpreter(model_path=str(path)).get_signature_runner(signature)
        return {k: np.asarray(v) for k, v in runner(**inputs).items()}
    except Exception as e:  # noqa: BLE001 - LiteRT raises RuntimeError/ValueError
        raise VerificationError(f"LiteRT cannot run '{path}': {one_line(e)}") from None


def _onnx_session(path: Path):
    """An onnxruntime CPU session for the file, its warnings (unused initializers) kept quiet."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: they reach the caller as exceptions anyway
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`inputs` through the .onnx file in onnxruntime (CPU)."""
    try:
        session = _onnx_session(path)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, dict(inputs))))
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors
        raise VerificationError(f"onnxruntime cannot run '{path}': {one_line(e)}") from None


class NudgedReference:
    """The TensorFlow export's outputs at KINK_NUDGES inputs nudged from the probe (each float
    element times 1 + KINK_NUDGE * u, u uniform in [-1, 1], fixed seed); computed on first use."""

    def __init__(self, export_dir: Path, *, signature: str, probe: Mapping[str, np.ndarray]):
        self._export_dir, self._signature, self._probe = export_dir, signature, probe
        self._runs: list[dict[str, np.ndarray]] | None = None

    def runs(self) -> list[dict[str, np.ndarray]]:
        if self._runs is None:
            function = tf.saved_model.load(str(self._export_dir)).signatures[self._signature]
            rng = np.random.default_rng(0)
            self._runs = []
            for _ in range(KINK_NUDGES):
                inputs = {key: tf.constant(_nudge(value, rng)) for key, value in self._probe.items()}
                self._runs.append({key: value.numpy() for key, value in function(**inputs).items()})
        return self._runs


def _nudge(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if value.dtype.kind != "f":
        return value
    return (value * (1 + KINK_NUDGE * rng.uniform(-1, 1, value.shape))).astype(value.dtype)


def _compare(runtime: str, got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], path: Path,
             nudged: NudgedReference | None = None) -> str:
    """Check a runtime's outputs of the written file against the TensorFlow export's.

    Integer outputs must be equal. A float output passes when its largest difference is within
    FILE_RTOL (1e-5) of the output's largest magnitude. Otherwise each example must pass the kink
    test: guided backpropagation's saliency is piecewise constant in the input (a ReLU gate, a
    max-pool choice), so where a unit's pre-activation lies within rounding of its kink, forward
    values that differ in the last bits (another runtime's or kernel's summation order) flip that
    decision and change the saliency by that unit's whole contribution; TensorFlow's own saliency
    jumps the same way between inputs that differ by rounding. The example passes when its
    difference from TensorFlow's output at the probe or at the nearest of KINK_NUDGES inputs
    within KINK_NUDGE (1e-6) relative of it is at most FILE_RTOL plus the largest change of
    TensorFlow's own output among those inputs (all relative to the example's largest magnitude).
    On an example far from every kink TensorFlow's own change is 0 and the limit stays FILE_RTOL;
    a runtime or gradient error larger than TensorFlow's own variation still fails. Without
    `nudged` (no export to run) an output beyond FILE_RTOL fails.
    """
    worst, flips = 0.0, []
    for key, want in expected.items():
        if key not in got:
            raise VerificationError(f"{runtime}'s run of the written file has no output {key!r} (it has {', '.join(sorted(got))})")
        have = np.asarray(got[key])
        if have.shape != want.shape:
            raise VerificationError(f"{runtime}: output {key!r} has shape {have.shape}, the TensorFlow export's {want.shape}")
        if want.dtype.kind in "iub":
            if not np.array_equal(have, want):
                raise VerificationError(f"{runtime}: output {key!r} differs from the TensorFlow export's")
            continue
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        diff = float(np.max(np.abs(have.astype(np.float64) - want))) if want.size else 0.0
        relative = diff / scale if scale > 0 else diff
        if not np.isfinite(diff):
            raise VerificationError(f"{runtime}: output {key!r} is not finite (the written file's or the TensorFlow export's)")
        if relative > FILE_RTOL and nudged is None:
            raise VerificationError(
                f"{runtime}: output {key!r} of the written file differs from the TensorFlow export's "
                f"by {relative:.3g} relative (limit {FILE_RTOL})"
            )
        if relative > FILE_RTOL:
            flips.extend(_kink_test(runtime, key, have, want, [run[key] for run in nudged.runs()], relative))
            continue
        worst = max(worst, relative)
    text = f"{runtime} runs the file; every output within {worst:.2g} relative of the TensorFlow export"
    return text if not flips else f"{text} except at kink flips: {'; '.join(flips)}"


def _kink_test(runtime: str, key: str, have: np.ndarray, want: np.ndarray, others: list[np.ndarray],
               relative: float) -> list[str]:
    """The per-example kink test of _compare; one note per example that needed it."""
    examples = want.shape[0] if want.ndim else 1
    have, want = (np.asarray(a, np.float64).reshape(examples, -1) for a in (have, want))
    others = [np.asarray(o, np.float64).reshape(examples, -1) for o in others]
    notes = []
    for i in range(examples):
        base = want[i]
        scale = float(np.max(np.abs(base))) or 1.0
        alone = float(np.max(np.abs(have[i] - base))) / scale
        if alone <= FILE_RTOL:
            continue
        own = max(float(np.max(np.abs(o[i] - base))) / scale for o in others)
        nearest = min([alone] + [float(np.max(np.abs(have[i] - o[i]))) / scale for o in others])
        if not nearest <= FILE_RTOL + own:
            raise VerificationError(
                f"{runtime}: output {key!r} of the written file differs from the TensorFlow export's by "
                f"{relative:.3g} relative (limit {FILE_RTOL}); example {i} is {nearest:.3g} from TensorFlow's "
                f"at the probe or inputs within {KINK_NUDGE} of it, beyond {FILE_RTOL} + TensorFlow's own "
                f"variation there ({own:.3g}), so it is no kink flip"
            )
        notes.append(f"{key} example {i} {alone:.2g} off, {nearest:.2g} from TensorFlow's at inputs within "
                     f"{KINK_NUDGE}, where TensorFlow's own varies by {own:.2g}")
    return notes
