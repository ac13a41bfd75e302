"""Fold inference-mode BatchNorm into the convolution before it, in a SavedModel's functions.

Keras 3 lowers BatchNormalization at inference to `x * inv + shift` (inv = gamma / sqrt(var + eps),
shift = beta - mean * inv, both computed from variables), two full passes over the activation
after the convolution, and a third (`dy * inv`) in the backward pass. Folded,

    Conv2D(x, W) [+ b] -> Mul(inv) -> AddV2(shift)      becomes      BiasAdd(Conv2D(x, W * inv), b * inv + shift)

which TensorFlow's graph optimizer fuses into one convolution kernel (with the ReLU that usually
follows), and whose gradient needs no elementwise pass at all. Predictions change only by float
rounding; the converter's self-check compares them with the unfolded source.

The kernel is scaled on every call (the variables stay the source's), a read and a write of the
kernel for the three passes over the activation it saves. Early in a network that is a few
thousand weights against millions of activations; late, a 3x3x512x512 kernel (2.4 million weights)
meets a 7x7x512 activation (25 thousand per example), and folding would cost ten times what it
saves. So a BatchNorm is folded only where the activation of one example is at least two thirds
of the kernel (3 passes over it outweigh 2 over the kernel even at batch 1), or where the graph
does not say their sizes.

Only exact matches are rewritten: NHWC Conv2D or DepthwiseConv2dNative, optional BiasAdd, Mul by an
operand and AddV2 of an operand that do not depend on the function's data inputs, each
intermediate used once. Everything else is left alone.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, function_pb2, node_def_pb2, types_pb2

from gbp_rewrite.graph.graph_walk import node_of, output_index

_CONVS = ("Conv2D", "DepthwiseConv2dNative")
_ADDS = ("AddV2", "Add")


@dataclasses.dataclass(frozen=True)
class _Match:
    conv: node_def_pb2.NodeDef
    bias: node_def_pb2.NodeDef | None
    mul: node_def_pb2.NodeDef
    add: node_def_pb2.NodeDef
    inv_ref: str
    shift_ref: str


def fold_batchnorm(function_defs, *, every: bool = False) -> list[str]:
    """Fold every matching BatchNorm in the given FunctionDefs in place; return the folded Mul nodes.

    `every`: also where the size rule says folding costs more than it saves (portable exports:
    there the converters fold the scaled kernel into the file, and the backward op can then share
    the forward op's stored kernel)."""
    folded = []
    for function in function_defs:
        folded.extend(f"{function.signature.name}/{name}" for name in _fold_function(function, every=every))
    return folded


def _fold_function(function: function_pb2.FunctionDef, *, every: bool) -> list[str]:
    graph = _FunctionGraph(function, every=every)
    matches = [m for m in (graph.match(node) for node in function.node_def if node.op == "Mul") if m]
    for match in matches:
        graph.rewrite(match)
    graph.remove({m.mul.name for m in matches} | {m.bias.name for m in matches if m.bias is not None})
    return [m.mul.name for m in matches]


class _FunctionGraph:
    def __init__(self, function: function_pb2.FunctionDef, *, every: bool = False):
        self.function = function
        self.every = every
        self.nodes = {n.name: n for n in function.node_def}
        self.data_args = {a.name for a in function.signature.input_arg if a.type != types_pb2.DT_RESOURCE}
        self.consumers: dict[str, list[str]] = {}
        for node in function.node_def:
            for ref in node.input:
                self.consumers.setdefault(node_of(ref), []).append(node.name)
        for ref in function.ret.values():
            self.consumers.setdefault(node_of(ref), []).append("<return>")
        self._data_dependent: dict[str, bool] = {}

    # -- matching ------------------------------------------------------------------------------

    def depends_on_data(self, ref: str) -> bool:
        """True when the tensor `ref` depends on a data (non-resource) argument of the function."""
        start = node_of(ref)
        if start in self._data_dependent:
            return self._data_dependent[start]
        stack, order = [start], []
        seen = set()
        while stack:
            name = stack.pop()
            if name in seen or name in self._data_dependent:
                continue
            seen.add(name)
            order.append(name)
            node = self.nodes.get(name)
            if node is not None:
                stack.extend(node_of(r) for r in node.input if not r.startswith("^"))
        for name in reversed(order):  # inputs before consumers (a DAG)
            node = self.nodes.get(name)
            if node is None:
                self._data_dependent[name] = name in self.data_args
            else:
                self._data_dependent[name] = any(
                    self._data_dependent.get(node_of(r), True) for r in node.input if not r.startswith("^")
                )
        return self._data_dependent[start]

    def _single_consumer(self, name: str, consumer: str) -> bool:
        return self.consumers.get(name, []) == [consumer]

    def match(self, mul: node_def_pb2.NodeDef) -> _Match | None:
        if len(mul.input) != 2 or any(r.startswith("^") for r in mul.input):
            return None
        data = [self.depends_on_data(r) for r in mul.input]
        if data.count(True) != 1:
            return None
        activation_ref, inv_ref = (mul.input[0], mul.input[1]) if data[0] else (mul.input[1], mul.input[0])
        producer = self.nodes.get(node_of(activation_ref))
        bias = None
        if producer is not None and producer.op == "BiasAdd" and _nhwc(producer):
            bias, producer = producer, self.nodes.get(node_of(producer.input[0]))
            if self.depends_on_data(bias.input[1]) or not self._single_consumer(bias.name, mul.name):
                return None
        if producer is None or producer.op not in _CONVS or not _nhwc(producer):
            return None
        if self.depends_on_data(producer.input[1]):
            return None
        if not self._single_consumer(producer.name, (bias or mul).name):
            return None
        adds = self.consumers.get(mul.name, [])
        if len(adds) != 1 or adds[0] not in self.nodes:
            return None
        add = self.nodes[adds[0]]
        if add.op not in _ADDS or len(add.input) != 2 or any(r.startswith("^") for r in add.input):
            return None
        shift_refs = [r for r in add.input if node_of(r) != mul.name]
        if len(shift_refs) != 1 or self.depends_on_data(shift_refs[0]):
            return None
        dtypes = {n.attr["T"].type for n in (producer, mul, add) + ((bias,) if bias else ())}
        if len(dtypes) != 1:
            return None
        if not self._worth_folding(producer):
            return None
        return _Match(producer, bias, mul, add, inv_ref, shift_refs[0])

    def _worth_folding(self, conv: node_def_pb2.NodeDef) -> bool:
        """Do the 3 passes folding saves over one example's activation outweigh the 2 it adds over
        the kernel? True when the graph's `_output_shapes` do not say."""
        if self.every:
            return True
        activation = _elements(conv, per_example=True)
        kernel_node = self.nodes.get(node_of(conv.input[1]))
        kernel = None if kernel_node is None else _elements(kernel_node, output=output_index(conv.input[1]))
        if activation is None or kernel is None:
            return True
        return 3 * activation >= 2 * kernel

    # -- rewriting -----------------------------------------------------------------------------

    def _add_node(self, name: str, op: str, inputs: list[str], attrs: dict) -> str:
        node = self.function.node_def.add(name=name, op=op)
        node.input.extend(inputs)
        for key, value in attrs.items():
            node.attr[key].CopyFrom(value)
        self.nodes[name] = node
        return name

    def _const(self, name: str, values) -> str:
        tensor = tf.make_tensor_proto(values, dtype=tf.int32)
        return self._add_node(name, "Const", [], {
            "dtype": _type_attr(types_pb2.DT_INT32), "value": _tensor_attr(tensor),
        }) + ":output:0"

    def rewrite(self, match: _Match) -> None:
        prefix = f"{match.mul.name}/gbp_fold"
        dtype = match.mul.attr["T"].type
        t = {"T": _type_attr(dtype)}
        reshape = {"T": _type_attr(dtype), "Tshape": _type_attr(types_pb2.DT_INT32)}
        kernel_ref = match.conv.input[1]
        if match.conv.op == "Conv2D":
            kernel_shape = self._const(f"{prefix}/kernel_scale_shape", [1, 1, 1, -1])
        else:  # depthwise kernel [h, w, in, multiplier]: output channel = in * multiplier + j
            shape = self._add_node(f"{prefix}/kernel_shape", "Shape", [kernel_ref],
                                   {"T": _type_attr(dtype), "out_type": _type_attr(types_pb2.DT_INT32)})
            tail = self._add_node(f"{prefix}/kernel_shape_tail", "Slice",
                                  [f"{shape}:output:0", self._const(f"{prefix}/begin", [2]), self._const(f"{prefix}/size", [2])],
                                  {"T": _type_attr(types_pb2.DT_INT32), "Index": _type_attr(types_pb2.DT_INT32)})
            kernel_shape = self._add_node(f"{prefix}/kernel_scale_shape", "ConcatV2",
                                          [self._const(f"{prefix}/ones", [1, 1]), f"{tail}:output:0", self._const(f"{prefix}/axis", 0)],
                                          {"N": _int_attr(2), "T": _type_attr(types_pb2.DT_INT32),
                                           "Tidx": _type_attr(types_pb2.DT_INT32)}) + ":output:0"
        scale = self._add_node(f"{prefix}/kernel_scale", "Reshape", [match.inv_ref, kernel_shape], reshape)
        kernel = self._add_node(f"{prefix}/kernel", "Mul", [kernel_ref, f"{scale}:output:0"], t)
        match.conv.input[1] = f"{kernel}:z:0"
        flat = self._const(f"{prefix}/flat", [-1])
        shift = self._add_node(f"{prefix}/shift", "Reshape", [match.shift_ref, flat], reshape) + ":output:0"
        if match.bias is not None:
            inv = self._add_node(f"{prefix}/inv", "Reshape", [match.inv_ref, flat], reshape)
            scaled = self._add_node(f"{prefix}/bias_scaled", "Mul", [match.bias.input[1], f"{inv}:output:0"], t)
            shift = self._add_node(f"{prefix}/bias", "AddV2", [f"{scaled}:z:0", shift], t) + ":z:0"
        add_name = match.add.name
        match.add.op = "BiasAdd"
        del match.add.input[:]
        match.add.input.extend([f"{match.conv.name}:output:0", shift])
        match.add.ClearField("attr")
        match.add.attr["T"].CopyFrom(_type_attr(dtype))
        match.add.attr["data_format"].s = b"NHWC"
        self._rename_output(add_name, "z", "output")

    def _rename_output(self, node: str, old: str, new: str) -> None:
        before, after = f"{node}:{old}:", f"{node}:{new}:"
        for other in self.function.node_def:
            for i, ref in enumerate(other.input):
                if ref.startswith(before):
                    other.input[i] = after + ref[len(before):]
        for key, ref in list(self.function.ret.items()):
            if ref.startswith(before):
                self.function.ret[key] = after + ref[len(before):]

    def remove(self, names: set[str]) -> None:
        kept = [n for n in self.function.node_def if n.name not in names]
        del self.function.node_def[:]
        self.function.node_def.extend(kept)


def _elements(node: node_def_pb2.NodeDef, *, output: int = 0, per_example: bool = False) -> int | None:
    """The number of elements of a node's output by its `_output_shapes` attr (without the batch
    dimension for `per_example`); None when the attr is missing or a dimension unknown."""
    shapes = node.attr["_output_shapes"].list.shape if "_output_shapes" in node.attr else []
    if output >= len(shapes) or shapes[output].unknown_rank:
        return None
    dims = [d.size for d in shapes[output].dim][1 if per_example else 0:]
    if any(d < 0 for d in dims):
        return None
    count = 1
    for d in dims:
        count *= d
    return count


def _nhwc(node) -> bool:
    return "data_format" not in node.attr or node.attr["data_format"].s in (b"NHWC", b"")


def _type_attr(dtype):
    return attr_value_pb2.AttrValue(type=dtype)


def _int_attr(value: int):
    return attr_value_pb2.AttrValue(i=value)


def _tensor_attr(tensor):
    return attr_value_pb2.AttrValue(tensor=tensor)
