"""Gradient rules for the ReLU family: the only module with gradient math.

A rule maps (upstream gradient dy, forward output y) to the gradient passed down, dx:

    guided     Relu:  dx = dy * [x > 0] * [dy > 0]      Relu6: dx = dy * [0 < x < 6] * [dy > 0]
    deconvnet  both:  dx = dy * [dy > 0]
    vanilla    Relu:  dx = dy * [x > 0]                 Relu6: dx = dy * [0 < x < 6]

The gates are tested on the forward *output* y, exactly as TensorFlow's own Relu/Relu6 gradients do:
y > 0 iff x > 0, and 0 < y < 6 iff 0 < x < 6. They are built from TensorFlow's fused kernels
(ReluGrad, Relu6Grad, Relu), so they keep the tensor's dtype (float16 models work) and cost one
extra elementwise kernel over the plain gradient.

Two mechanisms use the same math: `register_graph_gradients` registers each (rule, op type) under a
name that the graph path writes into a NodeDef's `_gradient_op_type` attr, and `activation` builds
a `tf.custom_gradient` function for the Keras path (`pass_through` likewise for the output's
Softmax/Sigmoid).

The guided extension to smooth activations (opt-in, `convert(..., smooth_activations='guided')`)
is not in Springenberg et al.: at the OUTPUT op of a smooth activation f (swish's final Mul,
GELU's outer Mul, mish's Mul, the single Elu/Selu/Softplus/Sigmoid/Tanh op, ...) the upstream
gradient is gated, dy * [dy > 0], and then that op's TRUE gradient runs, as do the true
gradients of the activation's inner ops, so the activation passes dx = f'(x) * dy * [dy > 0].
`register_graph_gradients` registers it as `smooth_gradient_op_type(op_type)`; `smooth_activation`
builds it for the Keras path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable

import tensorflow as tf
from gbp_rewrite import tf_internals
from gbp_rewrite.errors import OptionError
from gbp_rewrite.tf_internals import gen_nn_ops

# Op types a rule rewrites. Everything else keeps its true gradient.
REWRITABLE_OP_TYPES = ("Relu", "Relu6")

# Activation op types that are reported and keep their true gradient: no agreed guided rule exists
# for them (the smooth ones among them get the guided extension only when it is asked for).
REPORTED_OP_TYPES = ("LeakyRelu", "Elu", "Selu", "Softplus", "Softsign", "Sigmoid", "Tanh", "Erf", "Erfc")

# Smooth activations (rules.SMOOTH_ACTIVATIONS_CHOICES): their default is the true gradient; with
# 'guided' (only under the guided rule) the guided extension: dx = f'(x) * dy * [dy > 0].
SMOOTH_TRUE = "true"
SMOOTH_GUIDED = "guided"
SMOOTH_ACTIVATIONS_CHOICES = (SMOOTH_TRUE, SMOOTH_GUIDED)
SMOOTH_RULE_LABEL = "guided (smooth extension)"
# Op types that end a smooth activation and get the gate: Mul (swish, GELU, mish, hard_silu; the
# hard_sigmoid's product with 1/6), RealDiv (hard_sigmoid's division by 6), the single ops.
SMOOTH_OUTPUT_OP_TYPES = ("Mul", "RealDiv", "Div", "Elu", "Selu", "Softplus", "Sigmoid", "Tanh")
# Given to the IdentityN of a saved tf.custom_gradient (Keras' swish is tf.nn.silu) over a smooth
# activation that gets the extension: dy passes to the ops it wraps, whose own gradients then run
# (the gated output Mul among them), instead of the saved function that would skip them.
OPS_BY_OP_GRADIENT = "GbpRewrite_IdentityN_op_by_op"

# The rule that is the true gradient: it needs no ReLU to reach (any differentiable model works).
VANILLA = "vanilla"

# dx = dy: given to each Softmax or Sigmoid that ends the explained output (score 'logit').
SOFTMAX_PASS_THROUGH = "GbpRewrite_Softmax_pass_through"

GradientFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _guided_relu(dy, y):
    return gen_nn_ops.relu_grad(gen_nn_ops.relu(dy), y)


def _guided_relu6(dy, y):
    return gen_nn_ops.relu6_grad(gen_nn_ops.relu(dy), y)


def _deconvnet(dy, y):
    del y  # the deconvnet rule ignores the forward pass entirely
    return gen_nn_ops.relu(dy)


def _vanilla_relu(dy, y):
    return gen_nn_ops.relu_grad(dy, y)


def _vanilla_relu6(dy, y):
    return gen_nn_ops.relu6_grad(dy, y)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A gradient rule: its name, a one-line description and dx = f(dy, y) per op type."""

    name: str
    description: str
    gradients: dict[str, GradientFn]

    def gradient(self, op_type: str, dy: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """The gradient passed down through one `op_type` op whose forward output is `y`."""
        return self.gradients[op_type](dy, y)


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            "guided",
            "guided backpropagation (Springenberg et al. 2014): dy * [x > 0] * [dy > 0]",
            {"Relu": _guided_relu, "Relu6": _guided_relu6},
        ),
        Rule(
            "deconvnet",
            "deconvnet (Zeiler & Fergus 2014): dy * [dy > 0]",
            {"Relu": _deconvnet, "Relu6": _deconvnet},
        ),
        Rule(
            "vanilla",
            "the true gradient: dy * [x > 0]",
            {"Relu": _vanilla_relu, "Relu6": _vanilla_relu6},
        ),
    )
}


def get_rule(name: str) -> Rule:
    """The rule called `name`, or an OptionError listing the valid names."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise OptionError(
            f"unknown rule {name!r}; valid rules: {', '.join(RULES)}"
        ) from None


def check_smooth_activations(smooth_activations: str, rule_name: str) -> None:
    """Refuse an unknown `smooth_activations` value, or 'guided' with another rule than guided."""
    if smooth_activations not in SMOOTH_ACTIVATIONS_CHOICES:
        raise OptionError(
            f"unknown smooth_activations {smooth_activations!r}; valid values: "
            f"{', '.join(SMOOTH_ACTIVATIONS_CHOICES)}"
        )
    if smooth_activations == SMOOTH_GUIDED and rule_name != "guided":
        raise OptionError(
            f"--smooth_activations guided extends the guided rule and is valid only with --rule guided, "
            f"not --rule {rule_name}; use --rule guided --smooth_activations guided, or leave "
            "--smooth_activations at true"
        )


def gradient_op_type(rule_name: str, op_type: str) -> str:
    """The `_gradient_op_type` attr value that selects `rule_name`'s gradient for `op_type`."""
    return f"GbpRewrite_{op_type}_{rule_name}"


def smooth_gradient_op_type(op_type: str) -> str:
    """The `_gradient_op_type` attr value that gives the output op of a smooth activation (an op
    type of SMOOTH_OUTPUT_OP_TYPES) the guided extension: its true gradient of dy * [dy > 0]."""
    return f"GbpRewrite_{op_type}_guided_smooth"


_registration_lock = threading.Lock()
_registered = False


def register_graph_gradients() -> None:
    """Register every rule for the graph path (idempotent, thread-safe).

    TensorFlow's registry refuses a second registration under the same name, so this registers once
    per process.
    """
    global _registered
    with _registration_lock:
        if _registered:
            return
        for rule in RULES.values():
            for op_type, fn in rule.gradients.items():
                _register(gradient_op_type(rule.name, op_type), fn, RULES["vanilla"].gradients[op_type])
        _register_pass_through(SOFTMAX_PASS_THROUGH)
        for op_type in SMOOTH_OUTPUT_OP_TYPES:
            _register_smooth(smooth_gradient_op_type(op_type), op_type)
        _register_ops_by_op(OPS_BY_OP_GRADIENT)
        _registered = True


# NodeDef attr the graph path sets beside `_gradient_op_type`: "<function>/<node>" of the site, so a
# recorded gradient names its site exactly (node names repeat across library functions).
SITE_ATTR = "_gbp_site"


def site_key(function: str, node: str) -> str:
    """The key a graph-path site is recorded under: its SITE_ATTR value."""
    return f"{function}/{node}"


# Per thread: the sets that collect the keys of the ops whose gradient a registered rule built, so
# the converter can prove every selected op really received its rule (an ignored attr would fail
# silently). Gradients are built on the thread that traces, so concurrent conversions stay apart.
_recorders = threading.local()


@contextlib.contextmanager
def record_applications():
    """Collect the keys of ops whose gradient one of our functions built on this thread: an op's
    SITE_ATTR (else its name) on the graph path, the `name` given to `activation`/`pass_through`."""
    seen: set[str] = set()
    active = _active_recorders()
    active.append(seen)
    try:
        yield seen
    finally:
        active.remove(seen)


def _active_recorders() -> list[set[str]]:
    if not hasattr(_recorders, "sets"):
        _recorders.sets = []
    return _recorders.sets


def note_application(op) -> None:
    """Record that a gradient function was built for `op`, for gradients registered outside this
    module that apply a rule (record_applications collects it)."""
    _note(op)


def _note(op) -> None:
    try:
        key = op.get_attr(SITE_ATTR).decode()
    except ValueError:  # an op not patched by gbp_rewrite (e.g. gradient_override_map)
        key = op.name
    _note_name(key)


def _note_name(name: str | None) -> None:
    if name is None:
        return
    for seen in _active_recorders():
        seen.add(name)


# ---- Grad-CAM (gbp_rewrite.cam): the true ReLU gradient on demand ----------------------------
# Grad-CAM's channel weights need the TRUE gradient of the score at a layer above which the ReLUs
# carry a rule. Within `true_relu_gradients()`, the gradient functions registered here and the
# `activation`s build the true ReLU/ReLU6 gradient (and record nothing), so a second symbolic
# gradient over the same forward ops gives it; the softmax pass-through is unaffected.
_true_mode = threading.local()


@contextlib.contextmanager
def true_relu_gradients():
    """Within, on this thread, every rule's ReLU gradient is built as the true gradient."""
    previous = getattr(_true_mode, "on", False)
    _true_mode.on = True
    try:
        yield
    finally:
        _true_mode.on = previous


def _true_gradients_on() -> bool:
    return getattr(_true_mode, "on", False)
# ---- end Grad-CAM -----------------------------------------------------------------------------


def _register(name: str, rule_fn: GradientFn, true_fn: GradientFn) -> None:
    def _gradient(op, dy):
        if _true_gradients_on():
            fn = true_fn
        else:
            fn = rule_fn
            _note(op)
        pooled = _gate_before_max_pool(fn, op, dy)
        return pooled if pooled is not None else fn(dy, op.outputs[0])

    if not _is_registered(name):
        tf.RegisterGradient(name)(_gradient)


def _gate_before_max_pool(fn: GradientFn, op, dy):
    """The rule applied at the pooled resolution, when the ReLU feeds a non-overlapping max-pool.

    Then dy = MaxPoolGrad(y, p, g) is g routed to each window's arg-max and 0 elsewhere, and at the
    arg-max y equals the pooled value p. Every rule maps 0 to 0, so gating g against p and routing
    afterwards, MaxPoolGrad(y, p, rule(g, p)), is exactly rule(dy, y), with the gate on a quarter of
    the elements (2x2 pools) and no full-resolution pass at all. Returns None when the pattern does
    not hold (overlapping windows, other consumers of y, another op).
    """
    pool_grad = dy.op
    if pool_grad.type != "MaxPoolGrad" or pool_grad.inputs[0] is not op.outputs[0]:
        return None
    ksize, strides = pool_grad.get_attr("ksize"), pool_grad.get_attr("strides")
    if list(ksize) != list(strides):  # overlapping windows sum their gradients: no shortcut
        return None
    pooled, upstream = pool_grad.inputs[1], pool_grad.inputs[2]
    return gen_nn_ops.max_pool_grad(
        op.outputs[0], pooled, fn(upstream, pooled), ksize=ksize, strides=strides,
        padding=pool_grad.get_attr("padding"), data_format=pool_grad.get_attr("data_format"),
    )


def _register_smooth(name: str, op_type: str) -> None:
    """The guided extension at a smooth activation's output op: TensorFlow's own gradient of
    `op_type`, given the gated upstream gradient dy * [dy > 0] (the true one in true mode)."""
    true_gradient = tf_internals.registered_gradient(op_type)

    def _gradient(op, dy):
        if _true_gradients_on():
            return true_gradient(op, dy)
        _note(op)
        return true_gradient(op, gen_nn_ops.relu(dy))

    if not _is_registered(name):
        tf.RegisterGradient(name)(_gradient)


def _register_ops_by_op(name: str) -> None:
    """IdentityN's own gradient (dy to each input), for the IdentityN of a saved custom gradient."""

    def _gradient(op, *dys):
        del op
        return list(dys)

    if not _is_registered(name):
        tf.RegisterGradient(name)(_gradient)


def _register_pass_through(name: str) -> None:
    def _gradient(op, dy):
        _note(op)
        return dy

    if not _is_registered(name):
        tf.RegisterGradient(name)(_gradient)


def _is_registered(name: str) -> bool:
    return tf_internals.is_gradient_registered(name)


def activation(rule_name: str, op_type: str, *, name: str | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """A ReLU or ReLU6 activation whose gradient is `rule_name`'s, for the Keras path.

    The forward pass is TensorFlow's own Relu/Relu6 kernel, so values are bit-identical to Keras'
    `relu`/`relu6`. When `name` is given, `op_token(name, y)` is recorded by `record_applications`
    each time the gradient is built for a forward op y, so the Keras path can prove, op by op, that
    the rule was reached.
    """
    rule = get_rule(rule_name)
    forward = {"Relu": tf.nn.relu, "Relu6": tf.nn.relu6}[op_type]

    @tf.custom_gradient
    def _activation(x):
        y = forward(x)
        _note_name(forward_token(op_token(name, y)))

        def _gradient(dy):
            if _true_gradients_on():
                return RULES["vanilla"].gradient(op_type, dy, y)
            _note_name(op_token(name, y))
            return rule.gradient(op_type, dy, y)

        return y, _gradient

    return _activation


def smooth_activation(forward: Callable[[tf.Tensor], tf.Tensor], *, name: str | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """The smooth activation `forward` (Keras' swish, gelu, elu, ...) unchanged, with the guided
    extension's gradient, for the Keras path: dx = f'(x) * dy * [dy > 0].

    f'(x) * g is the activation's own gradient (recorded by a tape around `forward`, so every op of
    it, a saved or nested custom gradient included, keeps its true gradient) of the gated g. `name`
    is recorded as `activation` records it (op_token of the forward output, and forward_token).
    """

    @tf.custom_gradient
    def _smooth(x):
        with tf.GradientTape(persistent=True) as tape:  # Grad-CAM builds a second, true gradient
            tape.watch(x)
            y = forward(x)
        _note_name(forward_token(op_token(name, y)))

        def _gradient(dy):
            if _true_gradients_on():
                return tape.gradient(y, x, output_gradients=dy)
            _note_name(op_token(name, y))
            return tape.gradient(y, x, output_gradients=gen_nn_ops.relu(dy))

        return y, _gradient

    return _smooth


def op_token(name: str | None, y) -> str | None:
    """What `activation` records for one traced forward op: 'name@op name' ('name' when eager).

    One activation function serves every call of a layer, so `name` alone would not say which of a
    layer's ReLU ops got the rule; the forward op's name does (the Keras path's traces name ops as
    its site search does).
    """
    if name is None:
        return None
    op = getattr(y, "op", None)
    op_name = getattr(op, "name", None) if not tf.executing_eagerly() else None
    return f"{name}@{op_name}" if op_name else name


def forward_token(token: str | None) -> str | None:
    """What `activation` records when it computes a forward op (`token` is its op_token): so the
    Keras path tells a ReLU its clone computes (then rewritten, or off the explained path) from a
    ReLU the layer computes in its own code (kept)."""
    return None if token is None else f"forward:{token}"


def pass_through(forward: Callable[[tf.Tensor], tf.Tensor], *, name: str | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """`forward` (a softmax or sigmoid) unchanged, with a gradient that passes straight through: dx = dy.

    On the explained output's softmax/sigmoid this makes d(score)/dx the gradient of the logit.
    `name` is recorded by `record_applications` when the gradient is built.
    """

    @tf.custom_gradient
    def _pass_through(x):
        def _gradient(dy):
            _note_name(name)
            return dy

        return forward(x), _gradient

    return _pass_through
