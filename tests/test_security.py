"""A SavedModel is a program: `inspect` lists its file-system ops, `convert` refuses to run a model
that has them unless allowed (issue #7, gbp_rewrite/security.py)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import op_def_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow.python.client import pywrap_tf_session

import gbp_rewrite
import hostile_models
import model_zoo
from conftest import REPO, cli_command, run_cli_concurrently
from gbp_rewrite.graph import savedmodel
from gbp_rewrite import security
from gbp_rewrite.errors import UnsafeModelError

# effect -> the op type that must be reported for it
EFFECT_OPS = {"write": "WriteFile", "read": "ReadFile", "list": "MatchingFiles", "checkpoint": "SaveV2",
              "print_file": "PrintV2"}


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """effect -> (model dir, the file it touches); the targets do not exist yet."""
    root = tmp_path_factory.mktemp("file_programs")
    built = {}
    for effect in [*EFFECT_OPS, "print_stderr"]:
        target = root / f"touched-by-{effect}"
        if effect in ("read", "list"):
            target.write_text("a file the model reads\n")
        built[effect] = (hostile_models.file_program(root / effect, effect=effect, target=target), target)
    return built


def _registered_ops() -> set[str]:
    ops = op_def_pb2.OpList()
    ops.ParseFromString(pywrap_tf_session.TF_GetBuffer(pywrap_tf_session.TF_GetAllOpList()))
    return {op.name for op in ops.op}


def test_every_listed_op_exists_in_this_tensorflow():
    """A misspelt or renamed op would silently never match: the list is checked against the registry."""
    listed = set(security.FILE_OPS) | set(security._CONDITIONAL_OPS) | security.CHECKPOINT_OPS
    assert not listed - _registered_ops()


@pytest.mark.parametrize("name", ["keras3@cnn", "tf_keras@cnn", "tf1@cnn", "tf2_module@cnn", "sink"])
def test_ordinary_models_have_no_file_ops(zoo, name):
    """The standard savers (TF1 saver_def subgraph, __inference__traced_save/restore_*) are exempt."""
    meta_graph = savedmodel.read(zoo.model(name)).meta_graph
    assert any(node.op == "SaveV2" for node in _all_nodes(meta_graph)), "the test needs a model with a saver"
    assert security.find_file_ops(meta_graph) == []


def test_a_vocabulary_file_from_the_models_assets_is_not_reported(tmp_path):
    model = hostile_models.vocabulary_module(tmp_path / "vocabulary")
    meta_graph = savedmodel.read(model).meta_graph
    assert any(node.op == "InitializeTableFromTextFileV2" for node in _all_nodes(meta_graph))
    assert security.find_file_ops(meta_graph) == []
    assert gbp_rewrite.inspect(model).file_ops == []


def test_the_export_carries_the_vocabulary_as_its_own_asset(tmp_path):
    """The export must not read the vocabulary from the source or from the file the source was
    built from: with both deleted it loads, gives the same scores and holds assets/vocabulary.txt."""
    model = hostile_models.vocabulary_module(tmp_path / "vocabulary")
    destination = tmp_path / "explainable"
    gbp_rewrite.convert(model, destination)
    shutil.rmtree(model)
    shutil.rmtree(hostile_models.vocabulary_source_file(model).parent)
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    scores = tf.saved_model.load(str(destination)).signatures["serving_default"](x=tf.constant(x))["scores"]
    expected = np.maximum(x @ hostile_models.vocabulary_weights(), 0) * (1 + hostile_models.VOCABULARY.index("cat"))
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6, atol=1e-6)
    vocabulary = (destination / "assets" / "vocabulary.txt").read_text()
    assert vocabulary.splitlines() == list(hostile_models.VOCABULARY)


def test_a_vocabulary_file_named_by_a_constant_is_reported(tmp_path):
    """The same initializer reading a path written into the graph (not an asset) is a file read."""
    model = hostile_models.vocabulary_module(tmp_path / "vocabulary")
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((model / "saved_model.pb").read_bytes())
    function, node = next((f, n) for f in proto.meta_graphs[0].graph_def.library.function for n in f.node_def
                          if n.op == "InitializeTableFromTextFileV2")
    constant = function.node_def.add(name="secret_path", op="Const")
    constant.attr["dtype"].type = tf.string.as_datatype_enum
    constant.attr["value"].tensor.CopyFrom(tf.make_tensor_proto("/etc/passwd"))
    node.input[1] = "secret_path:output:0"
    found = security.find_file_ops(proto.meta_graphs[0])
    assert [(op.function, op.node, op.op_type) for op in found] == [
        (function.signature.name, node.name, "InitializeTableFromTextFileV2")]


@pytest.mark.parametrize("effect", list(EFFECT_OPS))
def test_inspect_lists_and_convert_refuses_file_ops(programs, effect, tmp_path):
    model, target = programs[effect]
    info = gbp_rewrite.inspect(model)
    assert [op.op_type for op in info.file_ops] == [EFFECT_OPS[effect]]
    assert EFFECT_OPS[effect] in info.to_text() and "--allow_file_ops" in info.to_text()
    assert json.loads(json.dumps(info.to_dict()))["file_ops"][0]["op_type"] == EFFECT_OPS[effect]
    existed = target.exists()
    destination = tmp_path / "out"
    with pytest.raises(UnsafeModelError) as refused:
        gbp_rewrite.convert(model, destination)
    message = str(refused.value)
    assert EFFECT_OPS[effect] in message and "--allow_file_ops" in message and "\n" not in message
    assert not destination.exists()
    assert target.exists() == existed, "the model ran although it was refused"
    assert not list(target.parent.glob(f"{target.name}*")) or existed


def test_allow_file_ops_runs_the_model_and_says_so(programs, tmp_path):
    """With the flag, the conversion runs the model, which really writes its file: the refusal
    without the flag is what kept it from doing so."""
    model, target = programs["write"]
    assert not target.exists()
    report = gbp_rewrite.convert(model, tmp_path / "out", allow_file_ops=True)
    assert target.exists(), "the WriteFile op did not run: the test proves nothing"
    assert any("WriteFile" in warning for warning in report.warnings)
    saved = json.loads((tmp_path / "out" / "assets" / "gbp_rewrite_report.json").read_text())
    assert any("allow_file_ops" in warning for warning in saved["warnings"])


def test_printing_to_stderr_is_not_a_file_op(programs, tmp_path):
    model, _ = programs["print_stderr"]
    assert gbp_rewrite.inspect(model).file_ops == []
    gbp_rewrite.convert(model, tmp_path / "out")
    assert (tmp_path / "out" / "saved_model.pb").is_file()


def test_a_write_hidden_in_the_tf1_restore_subgraph_is_reported(zoo):
    """Only the savers' own checkpoint ops are exempt; anything else in their subgraph is not."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((zoo.model("tf1@cnn") / "saved_model.pb").read_bytes())
    meta_graph = proto.meta_graphs[0]
    graph = meta_graph.graph_def
    _add_node(graph.node, "evil/path", "Const", string="/tmp/owned")
    _add_node(graph.node, "evil/contents", "Const", string="owned")
    _add_node(graph.node, "evil/WriteFile", "WriteFile", inputs=["evil/path", "evil/contents"])
    restore = next(node for node in graph.node if node.name == meta_graph.saver_def.restore_op_name.split(":")[0])
    restore.input.append("^evil/WriteFile")
    found = security.find_file_ops(meta_graph)
    assert [(op.function, op.node, op.op_type) for op in found] == [("", "evil/WriteFile", "WriteFile")]


def test_a_function_named_like_the_standard_saver_is_exempt_only_inside_the_saver():
    meta_graph = meta_graph_pb2.MetaGraphDef()
    for name in ("__inference__traced_save_1", "__inference__traced_save_2"):
        function = meta_graph.graph_def.library.function.add()
        function.signature.name = name
        function.signature.input_arg.add(name="file_prefix", type=tf.string.as_datatype_enum)
        _add_node(function.node_def, "SaveV2", "SaveV2", inputs=["file_prefix"])
    _add_node(meta_graph.graph_def.node, "saver_filename", "Placeholder")
    _add_node(meta_graph.graph_def.node, "saver_call", "StatefulPartitionedCall", inputs=["saver_filename"],
              function="__inference__traced_save_1")
    _add_node(meta_graph.graph_def.node, "serving_call", "StatefulPartitionedCall", inputs=["saver_filename"],
              function="__inference__traced_save_2")
    meta_graph.saver_def.save_tensor_name = "saver_call:0"
    meta_graph.saver_def.filename_tensor_name = "saver_filename:0"
    found = security.find_file_ops(meta_graph)
    assert [(op.function, op.op_type) for op in found] == [("__inference__traced_save_2", "SaveV2")]


def _saver_function(meta_graph, kind: str):
    (function,) = [f for f in meta_graph.graph_def.library.function
                   if f.signature.name.startswith(f"__inference__traced_{kind}_")]
    return function


def _node(nodes, op_type: str):
    return next(node for node in nodes if node.op == op_type)


def _real_saver(zoo, name: str):
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((zoo.model(name) / "saved_model.pb").read_bytes())
    meta_graph = proto.meta_graphs[0]
    assert security.find_file_ops(meta_graph) == []  # as TensorFlow wrote it: exempt
    return meta_graph


@pytest.mark.parametrize("op_type, position", [("SaveV2", 0), ("MergeV2Checkpoints", 1), ("RestoreV2", 0)])
def test_a_saver_function_whose_checkpoint_op_uses_a_constant_path_is_reported(zoo, op_type, position):
    """A function named like (and called like) the standard saver exempts its checkpoint ops only
    when their path is the saver's filename argument, not any path the graph chooses."""
    meta_graph = _real_saver(zoo, "keras3@cnn")
    function = _saver_function(meta_graph, "restore" if op_type == "RestoreV2" else "save")
    _add_node(function.node_def, "evil_path", "Const", string="/tmp/owned")
    node = _node(function.node_def, op_type)
    node.input[position] = "evil_path:output:0"
    found = security.find_file_ops(meta_graph)
    assert [(op.function, op.op_type) for op in found] == [(function.signature.name, op_type)]


def test_a_saver_path_with_a_crafted_suffix_is_reported(zoo):
    """filename + '/../../elsewhere' is not a shard name TensorFlow builds."""
    meta_graph = _real_saver(zoo, "tf_keras@cnn")
    function = _saver_function(meta_graph, "save")
    suffix = next(n for n in function.node_def if n.op == "Const" and n.attr["value"].tensor.string_val == [b"_temp/part"])
    suffix.attr["value"].tensor.CopyFrom(tf.make_tensor_proto("/../../../tmp/owned"))
    found = security.find_file_ops(meta_graph)
    assert [op.op_type for op in found] == ["SaveV2", "MergeV2Checkpoints"]  # both use the shard names


def test_a_saver_called_with_another_path_is_reported(zoo):
    """The saver function's file_prefix must be fed the saver_def's filename, not a constant."""
    meta_graph = _real_saver(zoo, "tf2_module@cnn")
    _add_node(meta_graph.graph_def.node, "evil_path", "Const", string="/tmp/owned")
    restore_call = meta_graph.saver_def.restore_op_name.split(":")[0]
    caller = next(n for n in meta_graph.graph_def.node if n.name == restore_call)
    caller.input[0] = "evil_path"
    found = security.find_file_ops(meta_graph)
    assert [op.op_type for op in found] == ["RestoreV2"]


def test_a_tf1_saver_writing_a_constant_path_is_reported(zoo):
    meta_graph = _real_saver(zoo, "tf1@cnn")
    graph = meta_graph.graph_def
    _add_node(graph.node, "evil_path", "Const", string="/tmp/owned")
    _node(graph.node, "SaveV2").input[0] = "evil_path"
    found = security.find_file_ops(meta_graph)
    assert [(op.function, op.op_type) for op in found] == [("", "SaveV2")]


def test_command_line_refuses_and_allows(programs, tmp_path):
    model, _ = programs["checkpoint"]
    before = model_zoo.tree_digest(model)
    done = run_cli_concurrently({
        "refused": cli_command("convert", model, tmp_path / "refused"),
        "allowed": cli_command("convert", model, tmp_path / "allowed", "--allow_file_ops"),
    })
    refused, allowed = done["refused"], done["allowed"]
    assert refused.returncode == 1, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SaveV2" in lines[0] and "--allow_file_ops" in lines[0], refused.stderr
    assert not (tmp_path / "refused").exists()
    assert allowed.returncode == 0, allowed.stderr
    assert "allow_file_ops" in allowed.stdout and (tmp_path / "allowed" / "saved_model.pb").is_file()
    assert model_zoo.tree_digest(model) == before


def test_readme_has_a_security_section():
    assert "(docs/security.md)" in (REPO / "README.md").read_text()
    readme = (REPO / "docs" / "security.md").read_text()
    assert "# Security" in readme and "--allow_file_ops" in readme and "safe" in readme


# ---------------------------------------------------------------------------------------------


def _all_nodes(meta_graph):
    yield from meta_graph.graph_def.node
    for function in meta_graph.graph_def.library.function:
        yield from function.node_def


def _add_node(nodes, name, op, *, inputs=(), string=None, function=None):
    node = nodes.add(name=name, op=op)
    node.input.extend(inputs)
    if string is not None:
        node.attr["dtype"].type = tf.string.as_datatype_enum
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(string))
    if function is not None:
        node.attr["f"].func.name = function
    return node


def test_the_source_of_a_refused_model_is_unchanged(programs, tmp_path):
    model, _ = programs["write"]
    before = model_zoo.tree_digest(model)
    with pytest.raises(UnsafeModelError):
        gbp_rewrite.convert(model, tmp_path / "out")
    assert model_zoo.tree_digest(model) == before


class _ImageWriter(tf.Module):
    """An image model whose signature also writes a file: explain and verify would run it."""

    def __init__(self, target):
        super().__init__()
        self.target = str(target)
        self.w = tf.Variable(tf.random.stateless_normal([3, 2], seed=[5, 6]))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="image")], autograph=False)
    def serve(self, image):
        wrote = tf.io.write_file(self.target, "ran")
        with tf.control_dependencies([wrote]):
            return {"logits": tf.nn.relu(tf.matmul(tf.reduce_mean(image, axis=[1, 2]), self.w))}


@pytest.fixture(scope="module")
def image_writer_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_writer")
    module = _ImageWriter(root / "ran.txt")
    tf.saved_model.save(module, str(root / "source"), signatures={"serving_default": module.serve})
    gbp_rewrite.convert(root / "source", root / "export", allow_file_ops=True)
    (root / "ran.txt").unlink()  # the conversion ran it, as it said it would
    image = root / "x.png"
    image.write_bytes(tf.io.encode_png(np.full((8, 8, 3), 128, np.uint8)).numpy())
    return root


def test_explain_and_verify_refuse_file_ops_unless_allowed(image_writer_export, tmp_path):
    from gbp_rewrite.deploy import check as deploy_check
    from gbp_rewrite.pictures import explainer

    root = image_writer_export
    with pytest.raises(UnsafeModelError, match=r"WriteFile.*explaining with it runs it.*--allow_file_ops"):
        explainer.explain(root / "export", [root / "x.png"], out_dir=tmp_path / "out")
    with pytest.raises(UnsafeModelError, match=r"WriteFile.*verifying it runs it"):
        deploy_check.verify_export(root / "export")
    refused = subprocess.run(cli_command("explain", root / "export", "--image", root / "x.png", "--out", tmp_path / "cli"),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "--allow_file_ops" in refused.stderr, refused.stderr
    assert not (root / "ran.txt").exists() and not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()

    summary = explainer.explain(root / "export", [root / "x.png"], out_dir=tmp_path / "out", allow_file_ops=True)
    assert summary.total == 1 and not summary.failed and (root / "ran.txt").read_text() == "ran"
