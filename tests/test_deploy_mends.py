"""Regression tests for the deploy-side mends: unique picture names, shared constants and flags."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from gbp_rewrite.deploy import cpp_check, check as deploy_check, clean_process
from gbp_rewrite import report, self_check, signatures
from gbp_rewrite.pictures import explainer, images
from gbp_rewrite.serving import response_files, request as serving_request
from gbp_rewrite.cli import common
from gbp_rewrite.errors import SignatureError, SourceModelError
from gbp_rewrite.graph.savedmodel import TensorDesc


def test_unique_names_skips_names_other_inputs_bring():
    assert images.unique_names(["x", "x", "x_2"]) == ["x", "x_3", "x_2"]
    assert images.unique_names([]) == []


def test_decoded_pictures_of_same_named_images_never_overwrite_each_other(tmp_path):
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "x_1.png"]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
    assert response_files._stems([str(p) for p in paths], 3) == ["x", "x_2", "x_1"]
    saliency = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    written = response_files.write_response_files({"saliency": saliency}, tmp_path / "out", image_paths=paths)
    pictures = [p for p in written if p.suffix == ".png"]
    assert len(pictures) == len(set(pictures)) == 3 * 3


# ---------------------------------------------------------------------------------------------
# tools/serving_check/build.py links under a temporary name


@pytest.fixture
def build_module(tmp_path, monkeypatch):
    """build.py (a private copy of the module) building into tmp_path with a stand-in compiler."""
    spec = importlib.util.spec_from_file_location("serving_check_build_mends",
                                                  REPO / "tools" / "serving_check" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "BUILD_DIR", tmp_path)
    monkeypatch.setattr(module, "BINARY", tmp_path / "serving_check")
    monkeypatch.setattr(module, "STAMP", tmp_path / "serving_check.stamp.json")
    monkeypatch.setattr(module, "_compiler", lambda: "c++")
    monkeypatch.setattr(module, "_command", lambda cxx, output: [cxx, "-o", str(output)])
    return module


def test_interrupted_build_leaves_no_binary(build_module, tmp_path, monkeypatch):
    def interrupted_link(cmd, cxx):
        Path(cmd[-1]).write_bytes(b"half a binary")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_run_compiler", interrupted_link)
    with pytest.raises(KeyboardInterrupt):
        build_module.build(force=True)
    assert list(tmp_path.iterdir()) == []


def test_finished_build_is_renamed_into_place(build_module, tmp_path, monkeypatch):
    def link(cmd, cxx):
        Path(cmd[-1]).write_bytes(b"a binary")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(build_module, "_run_compiler", link)
    assert build_module.build(force=True) == build_module.BINARY
    assert build_module.BINARY.read_bytes() == b"a binary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving_check", "serving_check.stamp.json"]


# ---------------------------------------------------------------------------------------------
# Copies that must not drift


def test_preprocess_flag_offers_exactly_the_preprocessing_modes():
    assert common.PREPROCESS_MODES == tuple(images.PREPROCESSING)


def test_clean_process_copies_the_package_constants():
    """clean_process cannot import gbp_rewrite; it loads conventions.py by path, so these are equal."""
    assert clean_process.CLASS_INDEX == signatures.CLASS_INDEX
    assert clean_process.EXPLAINED_CLASS == signatures.EXPLAINED_CLASS
    assert clean_process.EXPLAIN_CLASS == signatures.EXPLAIN_CLASS_SIGNATURE
    assert clean_process.REPORT_PATH == Path("assets") / report.REPORT_JSON
    assert clean_process.PREDICTION_RTOL == self_check.PREDICTION_RTOL
    assert clean_process.PREDICTION_ATOL == self_check.PREDICTION_ATOL


# ---------------------------------------------------------------------------------------------
# One rule for the inputs explain and request can feed images to


@pytest.mark.parametrize("shape, dtype, want", [
    ((None, 32, 24, 3), tf.float32, images.InputSpec(32, 24, tf.float32)),
    (tf.TensorShape([2, 8, 8, 3]), tf.float16, images.InputSpec(8, 8, tf.float16)),
    ((None, None, None, 3), tf.float32, images.NO_FIXED_SIZE),
    ((None, 32, 32, 1), tf.float32, images.NOT_RGB_INPUT),
    ((None, 32, 32, 3), tf.uint8, images.NOT_RGB_INPUT),
    ((None, 32, 3), tf.float32, images.NOT_RGB_INPUT),
    (None, tf.float32, images.NOT_RGB_INPUT),
    ((None, 32, 32, 3), None, images.NOT_RGB_INPUT),
])
def test_rgb_input_spec(shape, dtype, want):
    assert images.rgb_input_spec(shape, dtype) == want


class _OneInputModel:
    """Stands in for savedmodel.SavedModelFile: one signature with one input."""

    def __init__(self, tensor: TensorDesc):
        self.tensor = tensor

    def signature(self, key):
        return type("Signature", (), {"inputs": {self.tensor.key: self.tensor}})()


@pytest.mark.parametrize("shape, explain_says, request_says", [
    ((None, 32, 32, 1), "explain feeds RGB images", "`request` sends RGB images"),
    ((None, None, None, 3), "with no fixed height and width; explain resizes",
     "with no fixed height and width; `request` resizes"),
])
def test_explain_and_request_refuse_the_same_inputs_in_their_own_words(shape, explain_says, request_says):
    with pytest.raises(SourceModelError, match=explain_says):
        explainer._input_spec(Path("m"), "image", tf.TensorSpec(shape, tf.float32))
    with pytest.raises(SignatureError, match=request_says):
        serving_request.image_input(_OneInputModel(TensorDesc("image", "image:0", tf.float32, shape)), "s")
    fixed = (None, 32, 32, 3)
    assert explainer._input_spec(Path("m"), "image", tf.TensorSpec(fixed, tf.float32)) == (
        serving_request.image_input(_OneInputModel(TensorDesc("image", "image:0", tf.float32, fixed)), "s")[1])


# ---------------------------------------------------------------------------------------------
# The C++ check: where the binary is looked for, and output keys with spaces


def test_skip_message_names_the_binary_find_binary_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv(cpp_check.BINARY_ENV, str(tmp_path / "from_env"))
    assert cpp_check.binary_candidate(None) == tmp_path / "from_env"
    assert cpp_check.binary_candidate(tmp_path / "given") == tmp_path / "given"
    for option, looked_at in ((None, tmp_path / "from_env"), (tmp_path / "given", tmp_path / "given")):
        assert cpp_check.find_binary(option) is None
        (check,) = deploy_check._cpp_checks(option, tmp_path, [])
        assert check.status == "skip" and check.detail.startswith(f"{looked_at} is not built")


class _SpacedOutputs(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def __call__(self, x):
        return {"top score": tf.reduce_max(x, axis=-1), "all scores": x * 2.0}


def test_cpp_check_reads_output_keys_with_spaces(serving_check_binary, tmp_path):
    module = _SpacedOutputs()
    tf.saved_model.save(module, str(tmp_path / "model"), signatures={"serving_default": module.__call__})
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "x.npy", x)
    python = {k: v.numpy() for k, v in module.__call__(tf.constant(x)).items()}
    inputs = {"x": tmp_path / "x.npy"}
    ok, detail = cpp_check.check_signature(serving_check_binary, tmp_path / "model", "serving_default", inputs, python)
    assert ok, detail
    listed = cpp_check.run_signature(serving_check_binary, tmp_path / "model", "serving_default", inputs,
                                     tmp_path / "out")
    assert sorted(listed) == ["all scores", "top score"]
    ok, detail = cpp_check.check_signature(serving_check_binary, tmp_path / "model", "serving_default", inputs, None)
    assert ok and "runs in C++" in detail
