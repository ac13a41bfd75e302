"""Recognise activations that TensorFlow computes from several ops, and name them.

The one that matters for the gradient: ops that are not ReLU activations though TensorFlow
computes them with a ReLU op.
Keras lowers `hard_sigmoid` to `relu6(x + 3) / 6` and `hard_silu` (`hard_swish`) to
`x * relu6(x + 3) / 6`; MobileNetV3 (Keras 3 and tf-keras) writes the same as
`ReLU(6.)(x + 3.) * (1. / 6.)`, and tf-keras' hard_swish multiplies x by that. The Relu6 inside
is one piece of a smooth-ish gate, not a ReLU unit: giving it the guided gate would apply a rule
nobody defined, so such a Relu6 keeps its true gradient and is reported under the activation's
name.

The others name what the report and `inspect` list (they keep their true gradient unless the
guided extension to smooth activations is asked for, below):
swish/SiLU `x * sigmoid(x)`, mish `x * tanh(softplus(x))`, GELU `0.5 * x * (1 + erf(x / sqrt 2))`
(Erf, or Erfc of -x / sqrt 2 as TensorFlow writes it) and its tanh approximation
`0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))`. ELU, SELU, softplus, sigmoid and tanh are
single ops, named by their type.

For the guided extension to smooth activations (rules.SMOOTH_ACTIVATIONS_CHOICES),
`activation_outputs` gives each activation's OUTPUT op, the one whose gradient gets the gate:
swish's and mish's final Mul, GELU's outer Mul, hard_silu's Mul by x, hard_sigmoid's division by 6
(or product with 1/6), the single op itself for ELU, SELU, softplus, sigmoid and tanh; and, when a
`tf.custom_gradient` wraps that output (Keras' swish is `tf.nn.silu`: an IdentityN whose
`_gradient_op_type` names a gradient function, in a Keras 3 export one saved with the model),
that IdentityN.

The patterns are matched on NodeDefs of one graph or function body, whose tensor references are
'node:0' (graph) or 'node:output_arg:0' (function body); a pattern split across function calls
is not recognised.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np
import tensorflow as tf

from gbp_rewrite import rules
from gbp_rewrite.graph.graph_walk import node_of

HARD_SIGMOID = "hard_sigmoid"
HARD_SILU = "hard_silu"
SWISH = "swish"
MISH = "mish"
GELU = "gelu"
GELU_TANH = "gelu (tanh approximation)"

_SQRT_HALF = float(np.sqrt(0.5))
_SQRT_TWO_OVER_PI = float(np.sqrt(2.0 / np.pi))

_ADDS = ("Add", "AddV2")
_DIVS = ("RealDiv", "Div", "TrueDiv")
_CONST_PASS_THROUGH = ("Identity", "Cast")  # a constant may reach its use through these
# Single-op activations that are their own output op (when not a piece of a larger activation).
SINGLE_OP_ACTIVATIONS = ("Elu", "Selu", "Softplus", "Sigmoid", "Tanh")
# Ops that combine the activation's inner value with a constant on the way to its output op
# (GELU: 1 + erf(.); hard_sigmoid: relu6(.) / 6).
_CONSTANT_STEPS = ("Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "TrueDiv")
_GRADIENT_ATTR = "_gradient_op_type"


@dataclasses.dataclass(frozen=True)
class ActivationOutput:
    """The op a smooth activation's value comes out of, and the IdentityN of a tf.custom_gradient
    over it ('' when none)."""

    node: str
    custom_gradient: str = ""


def activation_outputs(nodes: Iterable) -> dict[str, ActivationOutput]:
    """{op name: its activation's output} for every op of `nodes` (NodeDefs of one graph or function
    body) that computes a smooth activation: the pieces composite_activations names (the Relu6 of
    hard_sigmoid/hard_silu included) and the single Elu/Selu/Softplus/Sigmoid/Tanh ops. An
    activation whose output cannot be told (a pattern split across function calls, a value used
    before its output op) is left out."""
    nodes = list(nodes)
    by_name = {node.name: node for node in nodes}
    consumers = _consumers(by_name.values())
    found = {}
    pieces = composite_activations(nodes)
    for name, activation in pieces.items():
        output = _composite_output(by_name[name], activation, by_name, consumers)
        if output is not None and by_name[output].op in rules.SMOOTH_OUTPUT_OP_TYPES:
            found[name] = ActivationOutput(output, _custom_gradient_over(output, consumers))
    for node in nodes:
        if node.op in SINGLE_OP_ACTIVATIONS and node.name not in pieces:
            found[node.name] = ActivationOutput(node.name, _custom_gradient_over(node.name, consumers))
    return found


def _composite_output(node, activation: str, by_name: Mapping, consumers: Mapping) -> str | None:
    """The output op of the composite `activation` of which `node` is a piece: follow the single
    use of the piece through steps with a constant (1 + erf, relu6 / 6) to the product with x
    (swish, GELU, mish, hard_silu), or, for hard_sigmoid, to the last step."""
    if activation == MISH and node.op == "Softplus":
        node = next((use for use in consumers.get(node.name, []) if use.op == "Tanh"), None)
        if node is None:
            return None
    if activation == HARD_SIGMOID:  # relu6(x + 3) / 6: the one division (or product with 1/6)
        uses = consumers.get(node.name, [])
        return uses[0].name if len(uses) == 1 else None
    current = node
    for _ in range(8):
        uses = consumers.get(current.name, [])
        if len(uses) != 1 or uses[0].op not in _CONSTANT_STEPS:
            return None
        if not _with_constant(uses[0], current.name, by_name):
            return uses[0].name if uses[0].op == "Mul" else None
        current = uses[0]
    return None


def _with_constant(node, producer: str, by_name: Mapping) -> bool:
    """True when `node` combines `producer`'s output with a scalar constant."""
    inputs = _data_inputs(node)
    if len(inputs) != 2:
        return False
    others = [b for a, b in (inputs, inputs[::-1]) if node_of(a) == producer]
    return bool(others) and _constant_value(others[0], by_name) is not None


def _constant_value(ref: str, by_name: Mapping):
    node = by_name.get(node_of(ref))
    for _ in range(8):
        if node is None or node.op not in _CONST_PASS_THROUGH:
            break
        node = by_name.get(node_of(node.input[0])) if node.input else None
    if node is None or node.op != "Const":
        return None
    try:
        array = tf.make_ndarray(node.attr["value"].tensor)
    except (TypeError, ValueError):
        return None
    return array if array.size == 1 else None


def _custom_gradient_over(output: str, consumers: Mapping) -> str:
    """The IdentityN of a tf.custom_gradient whose first input is `output`, else ''."""
    for use in consumers.get(output, []):
        if use.op == "IdentityN" and use.input and node_of(use.input[0]) == output and _GRADIENT_ATTR in use.attr:
            return use.name
    return ""


def composite_activations(nodes: Iterable) -> dict[str, str]:
    """{op name: activation} for the activation ops in `nodes` (NodeDefs of one graph or function
    body) that compute one piece of a larger activation: the Relu6 of hard_sigmoid/hard_silu, the
    Sigmoid of swish (x * sigmoid(x)), the Softplus and Tanh of mish (x * tanh(softplus(x))), the
    Erf/Erfc of GELU and the Tanh of GELU's tanh approximation."""
    by_name = {node.name: node for node in nodes}
    consumers = _consumers(by_name.values())
    found = {}
    for node in by_name.values():
        name = None
        if node.op == "Relu6":
            name = _hard_activation(node, by_name, consumers)
        elif node.op == "Sigmoid":
            name = SWISH if _times_own_input(node, _input_of(node, by_name), consumers) else None
        elif node.op == "Softplus":
            for tanh in consumers.get(node.name, []):
                if tanh.op == "Tanh" and _times_own_input(tanh, node.input[0], consumers):
                    found[tanh.name] = name = MISH
        elif node.op in ("Erf", "Erfc"):
            name = GELU if _scaled_input(node, by_name, (_SQRT_HALF, -_SQRT_HALF)) else None
        elif node.op == "Tanh" and node.name not in found:
            name = GELU_TANH if _scaled_input(node, by_name, (_SQRT_TWO_OVER_PI,)) else None
        if name is not None:
            found[node.name] = name
    return found


def _input_of(node, by_name: Mapping) -> str:
    """The data input of a unary op, looking through a scaling by the constant 1 (swish's beta)."""
    ref = node.input[0]
    producer = by_name.get(node_of(ref))
    if producer is not None and producer.op == "Mul":
        other = _other_operand(producer, 1.0, by_name)
        if other is not None:
            return other
    return ref


def _times_own_input(node, x_ref: str, consumers: Mapping) -> bool:
    """True when some use of `node` multiplies it by `x_ref` (swish: x * sigmoid(x))."""
    return any(_multiplies(use, x_ref, node.name) for use in consumers.get(node.name, []))


def _scaled_input(node, by_name: Mapping, factors) -> bool:
    """True when the op's input is a product with one of the constants `factors`, possibly of a
    negated tensor (erfc(-x / sqrt 2)), or a division by the reciprocal."""
    producer = by_name.get(node_of(node.input[0])) if node.input else None
    if producer is None:
        return False
    if producer.op == "Mul":
        return any(_other_operand(producer, f, by_name) is not None for f in factors)
    if producer.op in _DIVS:
        inputs = _data_inputs(producer)
        return len(inputs) == 2 and any(_is_constant(inputs[1], 1.0 / f, by_name) for f in factors)
    return False


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
    """True when `ref` is a one-element Const (possibly behind Identity/Cast) equal to `value` to
    float16 rounding (1/6 is stored as 0.16666667 in float32, 0.1666 in float16)."""
    array = _constant_value(ref, by_name)
    if array is None or not np.issubdtype(array.dtype, np.number):
        return False
    return bool(np.isclose(float(array.reshape(-1)[0]), value, rtol=1e-3, atol=0.0))
