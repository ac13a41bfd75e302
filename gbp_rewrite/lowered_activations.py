"""Recognise activations that TensorFlow computes with a ReLU op but that are not ReLU activations.

Keras lowers `hard_sigmoid` to `relu6(x + 3) / 6` and `hard_silu` (`hard_swish`) to
`x * relu6(x + 3) / 6`; MobileNetV3 (Keras 3 and tf-keras) writes the same as
`ReLU(6.)(x + 3.) * (1. / 6.)`, and tf-keras' hard_swish multiplies x by that. The Relu6 inside
is one piece of a smooth-ish gate, not a ReLU unit: giving it the guided gate would apply a rule
nobody defined, so such a Relu6 keeps its true gradient and is reported under the activation's
name.

The patterns are matched on NodeDefs of one graph or function body, whose tensor references are
'node:0' (graph) or 'node:output_arg:0' (function body); a pattern split across function calls
is not recognised.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import tensorflow as tf

from gbp_rewrite.graph_walk import node_of

HARD_SIGMOID = "hard_sigmoid"
HARD_SILU = "hard_silu"

_ADDS = ("Add", "AddV2")
_DIVS = ("RealDiv", "Div", "TrueDiv")
_CONST_PASS_THROUGH = ("Identity", "Cast")  # a constant may reach its use through these


def composite_activations(nodes: Iterable) -> dict[str, str]:
    """{Relu6 node name: 'hard_sigmoid' or 'hard_silu'} for the Relu6 ops in `nodes` (NodeDefs of
    one graph or function body) that compute part of one of those activations."""
    by_name = {node.name: node for node in nodes}
    consumers = _consumers(by_name.values())
    found = {}
    for node in by_name.values():
        if node.op == "Relu6":
            name = _hard_activation(node, by_name, consumers)
            if name is not None:
                found[node.name] = name
    return found


def _consumers(nodes) -> dict[str, list]:
    """Node name -> the nodes that read one of its outputs (control inputs left out)."""
    consumers: dict[str, list] = {}
    for node in nodes:
        for ref in node.input:
            if not ref.startswith("^"):
                consumers.setdefault(node_of(ref), []).append(node)
    return consumers


def _hard_activation(relu6, by_name: Mapping, consumers: Mapping) -> str | None:
    """'hard_sigmoid' when relu6 computes relu6(x + 3) and every use of it is a division by 6
    (or a product with 1/6); 'hard_silu' when every use of that quotient multiplies it by x."""
    add = by_name.get(node_of(relu6.input[0])) if relu6.input else None
    if add is None or add.op not in _ADDS:
        return None
    x_ref = _other_operand(add, 3.0, by_name)
    scaled = consumers.get(relu6.name, [])
    if x_ref is None or not scaled or not all(_scales_by_one_sixth(n, relu6.name, by_name) for n in scaled):
        return None
    uses = [(use, node) for node in scaled for use in consumers.get(node.name, [])]
    if uses and all(_multiplies(use, x_ref, node.name) for use, node in uses):
        return HARD_SILU
    return HARD_SIGMOID


def _data_inputs(node) -> list[str]:
    return [ref for ref in node.input if not ref.startswith("^")]


def _multiplies(node, x_ref: str, producer: str) -> bool:
    """True when `node` is x * (an output of `producer`), in either order."""
    inputs = _data_inputs(node)
    return node.op == "Mul" and len(inputs) == 2 and any(
        a == x_ref and node_of(b) == producer for a, b in (inputs, inputs[::-1]))


def _other_operand(node, value: float, by_name: Mapping) -> str | None:
    """The operand of a binary op whose other operand is the scalar constant `value`."""
    inputs = _data_inputs(node)
    if len(inputs) != 2:
        return None
    for this, other in (inputs, inputs[::-1]):
        if _is_constant(other, value, by_name):
            return this
    return None


def _scales_by_one_sixth(node, relu6_name: str, by_name: Mapping) -> bool:
    """True when `node` is relu6 / 6 or relu6 * (1/6)."""
    inputs = _data_inputs(node)
    if node.op in _DIVS:
        return len(inputs) == 2 and node_of(inputs[0]) == relu6_name and _is_constant(inputs[1], 6.0, by_name)
    if node.op == "Mul":
        other = _other_operand(node, 1.0 / 6.0, by_name)
        return other is not None and node_of(other) == relu6_name
    return False


def _is_constant(ref: str, value: float, by_name: Mapping) -> bool:
    """True when `ref` is a Const (possibly behind Identity/Cast) whose every element is `value`
    to float32 rounding (1/6 is stored as 0.16666667)."""
    node = by_name.get(node_of(ref))
    for _ in range(8):
        if node is None or node.op not in _CONST_PASS_THROUGH:
            break
        node = by_name.get(node_of(node.input[0])) if node.input else None
    if node is None or node.op != "Const":
        return False
    try:
        array = tf.make_ndarray(node.attr["value"].tensor)
    except (TypeError, ValueError):
        return False
    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return False
    return bool(np.isclose(float(array.reshape(-1)[0]), value, rtol=1e-3, atol=0.0))
