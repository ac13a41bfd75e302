"""The gradient rules on literal numbers: dx for given dy and forward output y."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from gbp_rewrite import rules
from gbp_rewrite.errors import OptionError

X = np.array([-2.0, -0.5, 0.0, 0.5, 3.0, 6.0, 7.0], np.float32)
DY = np.array([1.0, -1.0, 2.0, -3.0, 4.0, 5.0, -6.0], np.float32)
# By hand, per element: forward masks x>0 = [0,0,0,1,1,1,1], 0<x<6 = [0,0,0,1,1,0,0]; dy>0 = [1,0,1,0,1,1,0]
EXPECTED = {
    ("guided", "Relu"): [0, 0, 0, 0, 4, 5, 0],
    ("guided", "Relu6"): [0, 0, 0, 0, 4, 0, 0],
    ("deconvnet", "Relu"): [1, 0, 2, 0, 4, 5, 0],
    ("deconvnet", "Relu6"): [1, 0, 2, 0, 4, 5, 0],
    ("vanilla", "Relu"): [0, 0, 0, -3, 4, 5, -6],
    ("vanilla", "Relu6"): [0, 0, 0, -3, 4, 0, 0],
}


@pytest.mark.parametrize("rule,op_type", sorted(EXPECTED))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_rule_math(rule, op_type, dtype):
    y = {"Relu": np.maximum(X, 0), "Relu6": np.clip(X, 0, 6)}[op_type].astype(dtype)
    dx = rules.get_rule(rule).gradient(op_type, tf.constant(DY.astype(dtype)), tf.constant(y))
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx.numpy(), np.array(EXPECTED[rule, op_type], dtype))


@pytest.mark.parametrize("rule,op_type", sorted(EXPECTED))
def test_custom_gradient_activation_matches(rule, op_type):
    x = tf.constant(X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = rules.activation(rule, op_type)(x)
    np.testing.assert_array_equal(tape.gradient(y, x, output_gradients=tf.constant(DY)).numpy(), EXPECTED[rule, op_type])


def test_graph_registration_is_idempotent_and_honoured():
    rules.register_graph_gradients()
    rules.register_graph_gradients()
    graph = tf.Graph()
    with graph.as_default():
        x = tf.constant(X)
        with graph.gradient_override_map({"Relu": rules.gradient_op_type("guided", "Relu")}):
            y = tf.nn.relu(x)
        (dx,) = tf.gradients(y, x, grad_ys=tf.constant(DY))
    with tf.compat.v1.Session(graph=graph) as session:
        np.testing.assert_array_equal(session.run(dx), EXPECTED["guided", "Relu"])


def test_unknown_rule_lists_the_rules():
    with pytest.raises(OptionError, match="'smooth'.*guided, deconvnet, vanilla"):
        rules.get_rule("smooth")


@pytest.mark.parametrize("rule", ["guided", "deconvnet", "vanilla"])
@pytest.mark.parametrize("op_type,ksize", [("Relu", 2), ("Relu6", 2), ("Relu", 3)])
def test_gate_before_a_max_pool_equals_the_full_resolution_gate(rule, op_type, ksize):
    """A ReLU feeding a non-overlapping max-pool gets its gate at the pooled resolution; the
    result must equal the rule applied to TensorFlow's full-resolution MaxPoolGrad output, with
    saturated ReLU6 units, all-zero windows (ties) and negative upstream gradients."""
    rng = np.random.default_rng(7)
    x_value = (rng.normal(0, 4, (2, 6, 6, 3))).astype(np.float32)
    x_value[0, :2, :2, :] = -1.0  # a window that is all zeros after the ReLU: a tie
    upstream_value = rng.normal(0, 1, (2, 6 // ksize, 6 // ksize, 3)).astype(np.float32)
    forward = {"Relu": tf.nn.relu, "Relu6": tf.nn.relu6}[op_type]
    rules.register_graph_gradients()
    graph = tf.Graph()
    with graph.as_default():
        x = tf.constant(x_value)
        with graph.gradient_override_map({op_type: rules.gradient_op_type(rule, op_type)}):
            y = forward(x)
        pooled = tf.nn.max_pool2d(y, ksize, ksize, "VALID")
        (dx,) = tf.gradients(pooled, x, grad_ys=tf.constant(upstream_value))
        routed = tf.raw_ops.MaxPoolGrad(orig_input=y, orig_output=pooled, grad=tf.constant(upstream_value),
                                        ksize=[1, ksize, ksize, 1], strides=[1, ksize, ksize, 1], padding="VALID")
    with tf.compat.v1.Session(graph=graph) as session:
        got, dy, y_value = session.run([dx, routed, y])
    mask_forward = (y_value > 0) & ((y_value < 6) if op_type == "Relu6" else True)
    expected = {"guided": dy * mask_forward * (dy > 0), "deconvnet": dy * (dy > 0), "vanilla": dy * mask_forward}[rule]
    np.testing.assert_array_equal(got, expected)
    # The shortcut routes the pooled gate last; without it dx would come from ReluGrad/Relu6Grad/Relu.
    assert dx.op.type == "MaxPoolGrad"
