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
