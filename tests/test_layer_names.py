"""Layer names with Keras' and TensorFlow's default names (issue 11 item 1).

tf-keras and TF1 name a layer's scope after the layer: `dense` and `dense_1` are two layers. Keras 3
traces every call in a scope TensorFlow uniquifies (`dense_1` holds layer `dense`, `dense_1_2`
layer `dense_1`). Every layer holding a ReLU is selectable by its own name, the name selects that
layer alone, and the map equals the numpy reference with the rule at that layer only.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
import model_zoo
import numpy_reference as ref
from conftest import assert_close_relative, reference_inputs
from gbp_rewrite.graph import sites
from gbp_rewrite.errors import SelectionError
from gbp_rewrite import selection as site_selection

SPEC = model_zoo.name_default_layers(model_zoo.default_names_spec())
FEATURES = SPEC[0]["kernel"].shape[0]
DENSE_RELUS = ["dense", "dense_1", "dense_2"]

# model -> the layer path of the three ReLUs (the enclosing model's name first)
MODELS = {
    "default_names_tf_keras": ["sequential/" + name for name in DENSE_RELUS],
    "default_names_tf1": DENSE_RELUS,
    "default_names_keras3": ["sequential/" + name for name in DENSE_RELUS],
    "default_names_keras3.keras": ["sequential/" + name for name in DENSE_RELUS],
    "nested_default_names_keras3": ["outer/sequential/" + name for name in DENSE_RELUS],
    "nested_default_names_keras3.keras": ["outer/sequential/" + name for name in DENSE_RELUS],
}
CONVERSIONS = ["default_names_tf_keras", "default_names_tf1", "default_names_keras3", "default_names_keras3.keras",
               "nested_default_names_keras3"]


def _inputs():
    return reference_inputs(SPEC, batch=6, seed=7, input_shape=(FEATURES,))


def _saliency(zoo, export_dir, x):
    serving = zoo.loaded(export_dir).signatures["serving_default"]
    (input_key,) = serving.structured_input_signature[1]
    outputs = serving(**{input_key: tf.constant(x)})
    return outputs["saliency"].numpy(), outputs["explained_class"].numpy()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_relu_layer_is_listed_by_its_own_name(zoo, name):
    info = gbp_rewrite.inspect(zoo.model(name))
    assert [s.layer_path for s in info.sites] == MODELS[name]
    assert [s.layer for s in info.sites] == DENSE_RELUS
    assert all(s.op_type == "Relu" and s.rewritable for s in info.sites)


@pytest.mark.parametrize("name", CONVERSIONS)
@pytest.mark.parametrize("layer", ["dense", "dense_1"])
def test_a_name_selects_that_layer_alone(zoo, name, layer):
    export_dir, report = zoo.converted(name, layers=[layer])
    assert [(s.layer, s.status) for s in report.sites] == [
        (other, "rewritten" if other == layer else "kept: not selected") for other in DENSE_RELUS]
    x = _inputs()
    expected, classes = ref.saliency(SPEC, x, rule="vanilla", layer_rules={layer: "guided"})
    saliency, explained = _saliency(zoo, export_dir, x)
    assert_close_relative(saliency, expected)
    np.testing.assert_array_equal(explained, classes)
    everywhere, _ = ref.saliency(SPEC, x, rule="guided")
    assert not np.allclose(saliency, everywhere, rtol=1e-3, atol=0), "the selection changed nothing"


@pytest.mark.parametrize("name", ["default_names_tf_keras", "default_names_tf1", "default_names_keras3.keras"])
def test_all_layers_guided_equals_reference(zoo, name):
    export_dir, report = zoo.converted(name)
    assert [s.status for s in report.sites] == ["rewritten"] * 3
    x = _inputs()
    expected, _ = ref.saliency(SPEC, x, rule="guided")
    assert_close_relative(_saliency(zoo, export_dir, x)[0], expected)


def _function_base(name: str) -> str:
    """A function's name as written in any copy: no __inference_/__forward_ prefix, no number, no
    BatchNorm-folded twin suffix (the export renumbers the functions it saves)."""
    name = re.sub(r"_gbp_folded$", "", name)
    while re.match(r"__(inference|forward)_", name):
        name = re.sub(r"^__(inference|forward)_", "", name)
    return re.sub(r"_\d+$", "", name)


def _relu_gradients_in_export(export_dir) -> tuple[set, set]:
    """(guided, all): the (function, ReLU op) pairs whose gradient the export's backward functions
    hold, read from saved_model.pb. Guided backprop's gate on dy is a Relu of the upstream
    gradient inside `gradients/<op>_grad/`; the true gradient is a ReluGrad alone there."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel.FromString((export_dir / "saved_model.pb").read_bytes())
    guided, every = set(), set()
    for function in saved_model.meta_graphs[0].graph_def.library.function:
        backward = re.fullmatch(r"__inference___backward_(.*)_\d+_\d+", function.signature.name)
        for node in function.node_def if backward else ():
            scope = re.fullmatch(r"gradients(?:_\d+)?/(.*)_grad/([^/]+)", node.name)
            if scope:
                key = (_function_base(backward.group(1)), scope.group(1))
                every.add(key)
                if node.op == "Relu" and re.fullmatch(r"Relu(_\d+)?", scope.group(2)):
                    guided.add(key)
    return guided, every


def test_excluding_dense_keeps_dense_1(zoo):
    export_dir, report = zoo.converted("default_names_tf_keras", exclude_layers=["dense"])
    assert [s.status for s in report.sites] == ["kept: excluded", "rewritten", "rewritten"]
    # The report per op agrees with the graph written: only the rewritten ops have the guided gate,
    # and the excluded one keeps its true gradient.
    guided, every = _relu_gradients_in_export(export_dir)
    keys = [(_function_base(s.function), s.op_name) for s in report.sites]
    assert [key in guided for key in keys] == [False, True, True]
    assert all(key in every for key in keys)


def test_an_unknown_suffix_is_refused_with_the_real_names(zoo):
    with pytest.raises(SelectionError, match=r"'dense_3' matches no layer holding a ReLU.*sequential/dense_1"):
        gbp_rewrite.convert(zoo.model("default_names_tf_keras"), zoo.root / "never", layers=["dense_3"])


def test_keras3_model_saved_by_tf_saved_model_save_is_named_as_keras3(tmp_path):
    """A Keras 3 model inside a tf.Module: its scopes are Keras 3's, though it is no model.export."""
    import keras

    model = model_zoo.default_names_keras3(keras)

    class Wrapper(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32, name="x")])
        def serve(self, x):
            return {"scores": self.model(x)}

    wrapper = Wrapper()
    tf.saved_model.save(wrapper, str(tmp_path / "m"), signatures={"serving_default": wrapper.serve})
    info = gbp_rewrite.inspect(tmp_path / "m")
    assert [s.layer_path for s in info.sites] == ["sequential/" + name for name in DENSE_RELUS]


# One naming everywhere (issue 13 item 6): inspect, errors and the report say the layer path, and
# any tail of the path selects.

NESTED = [sites.Site("f", f"outer_1/sequential_1/{n}/Relu", "Relu", ("outer", "sequential", n)) for n in DENSE_RELUS]


@pytest.mark.parametrize("pattern,expected", [
    ("dense_1", ["dense_1"]),
    ("sequential/dense_1", ["dense_1"]),
    ("outer/sequential/dense_1", ["dense_1"]),
    ("sequential/dense_*", ["dense_1", "dense_2"]),
    ("dense*", DENSE_RELUS),
    ("sequential", DENSE_RELUS),
    ("outer/seq*", DENSE_RELUS),
])
def test_any_tail_of_the_layer_path_selects(pattern, expected):
    selection = site_selection.select(NESTED, layers=[pattern])
    assert [s.layer for s in selection.selected_sites] == expected


def test_a_tail_is_whole_names():
    with pytest.raises(SelectionError, match="'uter/sequential/dense' matches no layer"):
        site_selection.select(NESTED, layers=["uter/sequential/dense"])


def test_errors_list_at_most_ten_layers():
    many = [sites.Site("f", f"m/l{i}/Relu", "Relu", ("m", f"l{i}")) for i in range(13)]
    with pytest.raises(SelectionError) as error:
        site_selection.select(many, layers=["nope"])
    assert str(error.value).endswith("m/l0, m/l1, m/l2, m/l3, m/l4, m/l5, m/l6, m/l7, m/l8, m/l9, and 3 more (see inspect)")


def test_report_names_layers_as_inspect_does(zoo):
    _, report = zoo.converted("default_names_tf_keras", layers=["dense_1"])
    info = gbp_rewrite.inspect(zoo.model("default_names_tf_keras"))
    text = report.to_text()
    for site in info.sites:
        assert re.search(rf"^\s+{re.escape(site.layer_path)}\s+Relu\s", text, flags=re.M), text
