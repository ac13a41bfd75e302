"""Activations without a guided rule are named by activation in inspect and the report (issue 13
item 2): GELU (exact: Erf/Erfc; tanh approximation), swish, mish, and the single-op ELU, SELU,
softplus, sigmoid and tanh. All keep their true gradient; the one relu is rewritten."""

from __future__ import annotations

import numpy as np
import pytest

import gbp_rewrite
import model_zoo
from gbp_rewrite.graph import lowered_activations
from gbp_rewrite.errors import SelectionError

# layer path -> [(op type, activation named or '')]; tf.nn.gelu computes in its own "Gelu" scope
EXPECTED = {
    "smooth/d_gelu": [("Erfc", "gelu")],
    "smooth/d_gelu_tanh": [("Tanh", "gelu (tanh approximation)")],
    "smooth/d_swish": [("Sigmoid", "swish")],
    "smooth/d_mish": [("Softplus", "mish"), ("Tanh", "mish")],
    "smooth/d_elu": [("Elu", "")],
    "smooth/d_selu": [("Selu", "")],
    "smooth/d_softplus": [("Softplus", "")],
    "smooth/d_sigmoid": [("Sigmoid", "")],
    "smooth/d_tanh": [("Tanh", "")],
    "smooth/d_relu": [("Relu", "")],
}


def _grouped(sites):
    grouped = {}
    for site in sites:
        grouped.setdefault(site.layer_path, []).append((site.op_type, site.activation))
    return grouped


@pytest.mark.parametrize("source", ["export", "keras"])
def test_inspect_names_each_activation(zoo, source):
    import keras

    model = zoo.model("smooth_activations") if source == "export" else model_zoo.smooth_activations_keras3(keras)
    info = gbp_rewrite.inspect(model)
    assert _grouped(info.sites) == EXPECTED
    assert [s.layer_path for s in info.sites if s.rewritable] == ["smooth/d_relu"]


def test_report_says_what_each_activation_got(zoo):
    _, report = zoo.converted("smooth_activations")
    statuses = {s.path: s.status for s in report.sites}
    assert statuses["smooth/d_gelu"] == "kept: part of gelu, not a ReLU activation"
    assert statuses["smooth/d_swish"] == "kept: part of swish, not a ReLU activation"
    assert statuses["smooth/d_elu"] == "kept: no guided rule for Elu"
    assert statuses["smooth/d_relu"] == "rewritten"


def test_model_without_relu_names_its_activations(tmp_path):
    import keras

    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, activation="gelu")(inputs)
    x = keras.layers.Dense(3, activation="swish")(x)
    outputs = keras.layers.Dense(2)(x)
    with pytest.raises(SelectionError, match=r"activations found: gelu x1, swish x1\)"):
        gbp_rewrite.convert(keras.Model(inputs, outputs), tmp_path / "out")


def test_erf_gelu_and_division_form_are_recognised():
    """GELU as 0.5 * x * (1 + erf(x / sqrt 2)) in a plain tf.function (Erf, RealDiv), and an Erf
    of an unscaled input, which is no GELU."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def f(x):
        gelu = 0.5 * x * (1.0 + tf.math.erf(x / np.sqrt(2.0).astype(np.float32)))
        return gelu + tf.math.erf(x)

    graph = f.get_concrete_function().graph.as_graph_def()
    names = lowered_activations.composite_activations(graph.node)
    erfs = sorted(n.name for n in graph.node if n.op == "Erf")
    assert [names.get(n, "") for n in erfs] == ["gelu", ""]
