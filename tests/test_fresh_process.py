"""The exports run where gbp_rewrite is not importable, log no warning about unsaved custom
gradients, agree with this process's results, and keep variables as variables."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

MODELS = ["sink", "tf_keras@cnn", "tf1@cnn", "tf2_module@cnn", "keras3@residual_bn"]

_SCRIPT = r"""
import json, sys
sys.modules["gbp_rewrite"] = None  # any import of our package now fails
try:
    import gbp_rewrite  # noqa: F401
    raise SystemExit("gbp_rewrite is importable")
except ImportError:
    pass
import numpy as np
import tensorflow as tf

report = {}
for name, export_dir, inputs_file, outputs_file in json.loads(sys.argv[1]):
    loaded = tf.saved_model.load(export_dir)
    arrays = np.load(inputs_file)
    outputs = loaded.signatures["serving_default"](**{k: tf.constant(arrays[k]) for k in arrays.files})
    np.savez(outputs_file, **{k: v.numpy() for k, v in outputs.items()})
    report[name] = {"variables": len(loaded.variables), "signatures": sorted(loaded.signatures)}
print(json.dumps(report))
"""


def _input_arrays(signature):
    rng = np.random.default_rng(0)
    return {
        key: rng.uniform(0, 1, [3, *spec.shape[1:]]).astype(spec.dtype.as_numpy_dtype)
        for key, spec in signature.structured_input_signature[1].items()
    }


@pytest.fixture(scope="module")
def fresh(zoo, tmp_path_factory):
    work = tmp_path_factory.mktemp("fresh")
    jobs, expected = [], {}
    for name in MODELS:
        export_dir, _ = zoo.converted(name)
        signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
        arrays = _input_arrays(signature)
        np.savez(work / f"{name}-in.npz", **arrays)
        expected[name] = {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in arrays.items()}).items()}
        jobs.append([name, str(export_dir), str(work / f"{name}-in.npz"), str(work / f"{name}-out.npz")])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TF_CPP_MIN_LOG_LEVEL": "0"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(jobs)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr, expected, work


@pytest.mark.parametrize("name", MODELS)
def test_export_runs_without_gbp_rewrite(fresh, zoo, name):
    summary, _, expected, work = fresh
    got = np.load(work / f"{name}-out.npz")
    assert sorted(got.files) == sorted(expected[name])
    for key in got.files:
        np.testing.assert_array_equal(got[key], expected[name][key])
    assert {"serving_default", "explain_class"} <= set(summary[name]["signatures"])
    # The variables the source signature reads (a TF1 graph's reference variables are not Python
    # objects when loaded: count its checkpoint entries instead).
    source_model = tf.saved_model.load(str(zoo.model(name)))
    used = len(source_model.signatures["serving_default"].variables)
    checkpoint = str(zoo.model(name) / "variables" / "variables")
    stored = len([k for k, _ in tf.train.list_variables(checkpoint) if "CHECKPOINTABLE" not in k])
    assert summary[name]["variables"] == (used or stored) > 0, "variables were frozen or lost"


def test_no_warning_about_unsaved_custom_gradients(fresh):
    _, stderr, _, _ = fresh
    assert "unsaved custom gradients" not in stderr
    assert "_gradient_op_type" not in stderr


def test_export_is_about_the_size_of_the_source(zoo):
    def size(path, pattern):
        return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())

    for name in ("sink", "tf1@cnn"):
        export_dir, _ = zoo.converted(name)
        source = zoo.model(name)
        assert size(export_dir, "variables/*") <= 1.05 * size(source, "variables/*") + 4096
        assert size(export_dir, "variables/*") >= 0.45 * size(source, "variables/*")  # Keras 3 stores weights twice
