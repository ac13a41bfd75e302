"""Layer naming and selection of ReLU sites, across SavedModel families."""

from __future__ import annotations

import pytest
from tensorflow.core.protobuf import meta_graph_pb2

import gbp_rewrite
from gbp_rewrite.selection import select
from gbp_rewrite.graph import sites
from gbp_rewrite.errors import SelectionError


@pytest.mark.parametrize("family", ["keras3", "tf_keras", "tf1", "tf2_module"])
def test_cnn_layers_are_named_as_the_user_named_them(zoo, family):
    info = gbp_rewrite.inspect(zoo.model(f"{family}@cnn"))
    assert [(s.layer, s.op_type) for s in info.sites] == [("relu1", "Relu"), ("relu6_2", "Relu6")]


def test_residual_block_layers_keras3(zoo):
    info = gbp_rewrite.inspect(zoo.model("keras3@residual_bn"))
    assert [s.layer for s in info.sites] == ["relu1", "res_conv1"]


def _meta_graph_with_variables(*names, keras3=False):
    meta_graph = meta_graph_pb2.MetaGraphDef()
    root = meta_graph.object_graph_def.nodes.add()
    if keras3:
        for child in ("_all_variables", "_misc_assets"):
            root.children.add(local_name=child, node_id=0)
    for name in names:
        meta_graph.object_graph_def.nodes.add().variable.name = name
    return meta_graph


@pytest.mark.parametrize("keras3,function,node,expected", [
    # Keras 3 traces every call in a uniquified scope: conv1_1 is layer conv1, shared_3 the
    # second call of layer shared; a layer really named foo_1 appears as foo_1_1.
    (True, "__inference___call___1", "model_1/conv1_1/Relu", ("model", "conv1")),
    (True, "__inference___call___1", "model_1/shared_3/Relu", ("model", "shared")),
    (True, "__inference___call___1", "model_1/foo_1_1/Relu", ("model", "foo_1")),
    (True, "__inference___call___1", "model_1/block_1/inner_1/Relu6", ("model", "block", "inner")),
    # tf-keras and plain TF keep scopes verbatim, unless stripping gives a known layer.
    (False, "__inference__wrapped_model_7", "model/block_1/Relu", ("model", "block_1")),
    (False, "__inference__wrapped_model_7", "model/conv1_1/Relu", ("model", "conv1")),
    (False, "__inference_conv1_layer_call_and_return_conditional_losses_42", "Relu", ("conv1",)),
    (False, "", "Relu_3", ("Relu_3",)),
])
def test_layer_paths(keras3, function, node, expected):
    namer = sites._LayerNamer(_meta_graph_with_variables("conv1/kernel", "foo_1/kernel", keras3=keras3))
    assert namer.path(function, node) == expected


@pytest.mark.parametrize("keras3,node,expected", [
    # tf-keras and TF1: the scope is the layer; dense_1 is a layer of its own.
    (False, "sequential/dense_1/Relu", ("sequential", "dense_1")),
    (False, "dense_1/Relu", ("dense_1",)),
    (False, "dense/Relu_1", ("dense",)),  # tf-keras: a shared layer's second call
    (False, "fc_1/Relu", ("fc",)),  # TF1: variable scope fc re-entered for shared weights
    (False, "block_1/Relu", ("block_1",)),  # TF1: a scope without variables is its own name
    # Keras 3: exactly one suffix is TensorFlow's, whatever the layer is called.
    (True, "sequential_1/dense_1/Relu", ("sequential", "dense")),
    (True, "sequential_1/dense_1_2/Relu", ("sequential", "dense_1")),
    (True, "sequential_1/dense_2_1/Relu", ("sequential", "dense_2")),
    (True, "outer_1/sequential_1/dense_1_2/Relu", ("outer", "sequential", "dense_1")),
])
def test_layer_paths_with_default_names(keras3, node, expected):
    namer = sites._LayerNamer(_meta_graph_with_variables("dense/kernel", "dense_1/kernel", "dense_2/kernel",
                                                         "fc/kernel", keras3=keras3))
    assert namer.path("f", node) == expected


def _site(path, op_type="Relu", node=None):
    return sites.Site("f", node or "/".join(path) + "/" + op_type, op_type, tuple(path))


SITES = [
    _site(("m", "conv1")), _site(("m", "block", "conv_a")), _site(("m", "block", "conv_b"), "Relu6"),
    _site(("m", "leaky"), "LeakyRelu"),
]


@pytest.mark.parametrize("layers,exclude,expected", [
    (None, None, {"conv1", "conv_a", "conv_b"}),
    (["conv*"], None, {"conv1", "conv_a", "conv_b"}),
    (["block"], None, {"conv_a", "conv_b"}),
    (["m/block/conv_a"], None, {"conv_a"}),
    (None, ["block"], {"conv1"}),
    ("conv1, conv_b", None, {"conv1", "conv_b"}),
])
def test_selection(layers, exclude, expected):
    selection = select(SITES, layers=layers, exclude_layers=exclude)
    assert {s.layer for s in selection.selected_sites} == expected
    assert selection.status(SITES[3]) == "kept: no guided rule for LeakyRelu"


def test_selection_errors_list_the_layers():
    with pytest.raises(SelectionError, match=r"--layers 'leaky' matches no layer holding a ReLU.*conv1"):
        select(SITES, layers=["leaky"])
    with pytest.raises(SelectionError, match="--exclude_layers 'nope'"):
        select(SITES, exclude_layers=["nope"])
