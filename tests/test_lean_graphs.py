"""What the conversion leaves out of the graphs it loads and writes, to convert faster, and what
it must keep: the export's saver (C++ and TF Serving restore variables with it), functions an
implementation selector may swap in, and the source's own failure on the probe batch."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

import gbp_rewrite
from gbp_rewrite.graph import graph_walk, savedmodel, staging
from gbp_rewrite.errors import SourceModelError


def _meta_graph(path) -> meta_graph_pb2.MetaGraphDef:
    proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    return proto.meta_graphs[0]


def _saver_functions(meta_graph) -> set[str]:
    """The standard saver functions the graph's library holds."""
    saver = graph_walk.saver_only_functions(meta_graph, graph_walk.saver_subgraph(meta_graph))
    return saver & {f.signature.name for f in meta_graph.graph_def.library.function}


def test_export_keeps_its_saver_and_drops_dead_functions(zoo):
    """The gradient of a call leaves the callee's original beside its forward/backward pair: a
    dead copy of the forward pass, which the export must not carry."""
    export_dir, _ = zoo.converted("shapes_cnn")
    meta_graph = _meta_graph(export_dir)
    assert len(_saver_functions(meta_graph)) == 2  # __traced_save and __traced_restore
    assert graph_walk.unreachable_functions(meta_graph) == set()
    # The pruned graph was written after TensorFlow's fingerprint: it must describe the file as written.
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    written = tf.saved_model.experimental.read_fingerprint(str(export_dir))
    fresh = fingerprint_pb2.FingerprintDef.FromString(fingerprinting.CreateFingerprintDef(str(export_dir)))
    assert written.saved_model_checksum == fresh.saved_model_checksum


def test_unreachable_functions_keeps_swappable_implementations():
    meta_graph = meta_graph_pb2.MetaGraphDef()
    library = meta_graph.graph_def.library
    for name in ("called", "dead", "alternative", "called_by_called"):
        library.function.add().signature.name = name
    library.function[0].node_def.add(name="call", op="PartitionedCall").attr["f"].func.name = "called_by_called"
    library.function[2].attr["api_implements"].CopyFrom(attr_value_pb2.AttrValue(s=b"lstm_abc"))
    top = meta_graph.graph_def.node.add(name="run", op="StatefulPartitionedCall")
    top.attr["f"].func.name = "called"
    assert graph_walk.unreachable_functions(meta_graph) == {"dead"}


def test_patched_copy_leaves_out_the_saver_and_still_loads(zoo):
    model = savedmodel.read(zoo.model("shapes_cnn"))
    assert len(_saver_functions(model.meta_graph)) == 2
    with staging.patched_copy(model, {}) as patched:
        assert _saver_functions(_meta_graph(patched.path)) == set()
        loaded = staging.load(patched.path, tags=model.tags)
        source = zoo.loaded(zoo.model("shapes_cnn"))
        signature = loaded.signatures["serving_default"]
        (key,) = signature.structured_input_signature[1]
        x = tf.constant(np.random.default_rng(0).random((2, 32, 32, 3)), tf.float32)
        got, want = signature(**{key: x}), source.signatures["serving_default"](**{key: x})
        for name in want:
            np.testing.assert_array_equal(got[name].numpy(), want[name].numpy())
        assert len(loaded.variables) == len(source.variables)


class _FailsOnTheProbe(tf.Module):
    """A model that refuses inputs in [0, 1), which the probe batch draws from."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(tf.ones([3, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")], autograph=False)
    def serve(self, x):
        check = tf.debugging.assert_greater_equal(x, 1.0, message="inputs must be at least 1")
        with tf.control_dependencies([check]):
            return {"y": tf.nn.relu(tf.matmul(x, self.w))}


def test_a_source_that_fails_on_the_probe_is_one_clear_error(tmp_path):
    """The probe runs beside the trace (on another thread); its failure still surfaces as the
    source's one-line error, and nothing is written."""
    module = _FailsOnTheProbe()
    source = tmp_path / "picky"
    tf.saved_model.save(module, str(source), signatures={"serving_default": module.serve})
    with pytest.raises(SourceModelError, match=r"fails on a probe batch \(x: \[2, 3\]\).*at least 1"):
        gbp_rewrite.convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picky"]


def test_one_line_finds_the_cause_of_a_graph_execution_error():
    """TensorFlow's message starts with a banner and the defining stack; the cause comes after.
    clean_process (which runs without the package) keeps a copy of the rule: the same line."""
    from gbp_rewrite.deploy import clean_process
    from gbp_rewrite.errors import one_line

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)], autograph=False)
    def reshape(x):
        return tf.reshape(x, tf.stack([5, tf.shape(x)[0]]))

    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        reshape(tf.zeros([2, 3]))
    line = one_line(caught.value)
    assert line.startswith("Input to reshape is a tensor with 6 values") and line.endswith("(at node Reshape)")
    assert clean_process.one_line(caught.value) == f"InvalidArgumentError: {line}"
    assert one_line(ValueError("first\nsecond")) == "first" and one_line(KeyError()) == "KeyError"
