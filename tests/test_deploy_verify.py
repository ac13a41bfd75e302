"""`verify` and the C++ loader: converted models run without gbp_rewrite, as TF Serving runs them;
models TF Serving could not run (Python ops, custom ops, outputs without a batch dimension,
wrong predictions) are flagged with the reason."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import gbp_rewrite
import model_zoo
from conftest import INPUT_SHAPE, REPO, cli_command, run_cli_concurrently
from gbp_rewrite.deploy import cpp_check

CONVERTED = ["shapes_cnn", "tf_keras@cnn", "tf1@cnn"]
CPP = "C++ loader (LoadSavedModel + Session::Run)"
PYTHON_WHY = "TF Serving has no Python interpreter; the op would fail at run time"


def _status(report, name):
    return report.check(name).status


# ---------------------------------------------------------------------------------------------
# The C++ loader on converted models, compared with Python directly (not through verify)


def _python_outputs(loaded, key, inputs):
    outputs = loaded.signatures[key](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


@pytest.mark.oldest
@pytest.mark.parametrize("name", CONVERTED)
def test_cpp_loader_equals_python(zoo, serving_check_binary, name, tmp_path):
    export_dir, conversion = zoo.converted(name)
    loaded = tf.saved_model.load(str(export_dir))
    spec = loaded.signatures["serving_default"].structured_input_signature[1]
    (key, image_spec), = spec.items()
    shape = [3, *image_spec.shape[1:]]
    image = np.random.default_rng(5).uniform(-1, 2, size=shape).astype(np.float32)
    np.save(tmp_path / "image.npy", image)
    python = _python_outputs(loaded, "serving_default", {key: image})
    classes = (python["explained_class"] + 1) % python[conversion.explained_output].shape[1]
    np.save(tmp_path / "class_index.npy", classes)
    python_by_class = _python_outputs(loaded, "explain_class", {key: image, "class_index": classes})
    for signature, inputs, want in [
        ("serving_default", {key: tmp_path / "image.npy"}, python),
        ("explain_class", {key: tmp_path / "image.npy", "class_index": tmp_path / "class_index.npy"}, python_by_class),
    ]:
        got = cpp_check.run_signature(serving_check_binary, export_dir, signature, inputs, tmp_path / signature)
        assert sorted(got) == sorted(want)
        for output, value in want.items():
            assert got[output].dtype == value.dtype and got[output].shape == value.shape, output
            np.testing.assert_allclose(got[output], value, rtol=1e-6, atol=1e-6, err_msg=f"{signature}/{output}")
        assert np.any(got["saliency"] != 0)
    assert not np.array_equal(python["saliency"], python_by_class["saliency"])  # other classes, other maps


# ---------------------------------------------------------------------------------------------
# verify on converted models


# tf-keras exports go through the C++ loader above; one clean check per source kind is enough here.
@pytest.mark.parametrize("name", ["shapes_cnn", "tf1@cnn"])
def test_verify_passes_on_converted_models(zoo, serving_check_binary, name, monkeypatch):
    # Even with the repository on the caller's PYTHONPATH, the check process cannot import us.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    export_dir, _ = zoo.converted(name)
    # The shipped model's source is also given as the .keras file it was exported from.
    source = REPO / "testdata" / "shapes_cnn.keras" if name == "shapes_cnn" else zoo.model(name)
    report = gbp_rewrite.verify_export(export_dir, source=source, serving_check=serving_check_binary)
    assert report.ok, report.to_text()
    facts = report.facts
    assert facts["gbp_rewrite_importable"] is False and facts["repo_on_sys_path"] is False
    assert facts["pythonpath"] == "" and not facts["cwd"].startswith(str(REPO))
    for signature in ("serving_default", "explain_class"):
        for check in (f"runs: {signature}", f"predictions: {signature}", f"REST row format: {signature}",
                      f"saliency: {signature}/saliency", f"{CPP}: {signature}"):
            assert _status(report, check) == "pass", check
    assert "equal Python's" in report.check(f"{CPP}: serving_default").detail
    assert {"ReluGrad", "Conv2DBackpropInput"} <= set(report.op_types)  # the saliency is in the graph
    assert not [t for t in report.op_types if "PyFunc" in t]


# ---------------------------------------------------------------------------------------------
# Models TF Serving could not run


class _Unservable(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(tf.random.stateless_normal([4, 3], seed=[1, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def python_ops(self, x):
        doubled = tf.py_function(lambda t: t * 2.0, [x], tf.float32)
        halved = tf.numpy_function(lambda t: t / 2.0, [x], tf.float32)
        y = tf.ensure_shape(doubled + halved, [None, 4])
        return {"scores": tf.nn.softmax(tf.matmul(tf.nn.relu(y), self.w))}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def total(self, x):
        scores = tf.matmul(tf.nn.relu(x), self.w)
        return {"scores": scores, "total": tf.reduce_sum(scores)}  # 'total' has no batch dimension


@pytest.fixture(scope="module")
def unservable(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "unservable"
    module = _Unservable()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.python_ops,
                                                        "total": module.total})
    return path


def test_python_ops_and_lost_batch_dimension_are_flagged(unservable, serving_check_binary):
    report = gbp_rewrite.verify_export(unservable, serving_check=serving_check_binary)
    assert not report.ok
    python_ops = report.check("op audit: no Python ops")
    assert python_ops.status == "fail" and python_ops.why == PYTHON_WHY
    assert "EagerPyFunc" in python_ops.detail and "PyFunc" in python_ops.detail.replace("EagerPyFunc", "")
    assert _status(report, "runs: serving_default") == "fail"
    cpp = report.check(f"{CPP}: serving_default")
    assert cpp.status == "fail" and "PyFunc" in cpp.detail  # the C++ runtime has no kernel for it
    batch = report.check("REST row format: total")
    assert batch.status == "fail" and "total" in batch.detail and "batch dimension" in batch.why
    assert _status(report, "runs: total") == "pass" and _status(report, f"{CPP}: total") == "pass"
    text = report.to_text()
    assert "FAIL  op audit: no Python ops" in text and f"why: {PYTHON_WHY}" in text


def test_custom_op_is_flagged(zoo, serving_check_binary, tmp_path):
    import shutil

    export_dir = tmp_path / "custom"
    shutil.copytree(zoo.converted("tf_keras@cnn")[0], export_dir)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    renamed = 0
    for function in proto.meta_graphs[0].graph_def.library.function:
        for node in function.node_def:
            if node.op == "Relu":
                node.op, renamed = "GbpTestCustomRelu", renamed + 1
    assert renamed
    (export_dir / "saved_model.pb").write_bytes(proto.SerializeToString())
    report = gbp_rewrite.verify_export(export_dir, serving_check=serving_check_binary)
    custom = report.check("op audit: no custom ops")
    assert custom.status == "fail" and "GbpTestCustomRelu" in custom.detail and "Op type not registered" in custom.why
    assert _status(report, "loads in plain TensorFlow") == "fail"
    assert "GbpTestCustomRelu" in report.op_types


def test_wrong_predictions_are_flagged_and_missing_cpp_is_skipped(zoo, tmp_path):
    import numpy_reference as ref

    other = model_zoo.spec_tf1(ref.random_spec("cnn", seed=2, input_shape=INPUT_SHAPE), INPUT_SHAPE,
                               tmp_path / "other_weights")
    export_dir, _ = zoo.converted("tf1@cnn")
    report = gbp_rewrite.verify_export(export_dir, source=other, serving_check=tmp_path / "not_built")
    predictions = report.check("predictions: serving_default")
    assert predictions.status == "fail" and "scores differ" in predictions.detail
    assert _status(report, "predictions: explain_class") == "fail"
    assert _status(report, "runs: serving_default") == "pass"
    cpp = report.check(CPP)
    assert cpp.status == "skip" and "not built" in cpp.detail and "build the serving check into the cache" in cpp.detail
    assert [c.name for c in report.failures] == ["predictions: serving_default", "predictions: explain_class"]


def test_verify_command(zoo, unservable, serving_check_binary):
    # serving_check_binary: built first, so the commands' stderr holds no build line
    export_dir, _ = zoo.converted("tf1@cnn")
    results = run_cli_concurrently({
        "pass": cli_command("verify", export_dir, "--source", zoo.model("tf1@cnn"), "--json"),
        "fail": cli_command("verify", unservable),
    })
    passed = results["pass"]
    assert passed.returncode == 0, passed.stderr
    report = json.loads(passed.stdout)
    assert report["ok"] and all(c["status"] in ("pass", "skip") for c in report["checks"])
    failed = results["fail"]
    assert failed.returncode == 1
    out, err = failed.stdout, failed.stderr
    assert "  FAIL  op audit: no Python ops: " in out and f"why: {PYTHON_WHY}" in out
    assert "  PASS  loads in plain TensorFlow" in out and "result: FAIL" in out
    assert err.count("\n") == 1 and err.startswith("gbp-rewrite: error: ") and "Traceback" not in err
    assert "op audit: no Python ops" in err and PYTHON_WHY in err


def test_readme_deploy_commands_are_consistent():
    from gbp_rewrite.cli import build_parser

    readme = (REPO / "docs" / "deployment.md").read_text()
    block = re.search(r"# Deploy with TF Serving.*?```sh\n(.*?)\n```", readme, flags=re.S).group(1)
    lines = [shlex.split(line) for line in block.splitlines()]
    ours = [argv for argv in lines if argv[0] == ".venv/bin/gbp-rewrite"]
    assert [argv[1] for argv in ours] == ["convert", "verify", "request", "decode"]
    for argv in ours:  # each command takes the flags the README gives it
        _, stray = build_parser().parse_known_args(argv[1:])
        assert not stray, argv
    convert, verify, request, _ = ours
    base = convert[3]
    assert convert[convert.index("--serving_version") + 1] == "next"
    assert verify[2] == request[2] == f"{base}/1"  # the first version of an empty base path
    docker = next(argv for argv in lines if argv[0] == "docker")
    assert docker[docker.index("--mount") + 1] == f"type=bind,source={base},target=/models/shapes"
    assert "MODEL_NAME=shapes" in docker and "tensorflow/serving" in docker
    assert any("http://localhost:8501/v1/models/shapes:predict" in argv for argv in lines)
