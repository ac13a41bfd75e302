"""Regression tests for the deploy-side mends: unique picture names, shared constants and flags."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from gbp_rewrite.deploy import cpp_check, check as deploy_check, clean_process
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
    assert len(pictures) == len(set(pictures)) == 3 * 4  # figure, heat map, overlay, guided


# ---------------------------------------------------------------------------------------------
# The C++ serving check is built into the cache under a temporary name


@pytest.fixture
def build_module(tmp_path, monkeypatch):
    """gbp_rewrite.deploy.serving_check_build building into tmp_path with a stand-in compiler."""
    from gbp_rewrite.deploy import serving_check_build as module

    monkeypatch.setenv(module.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(module, "compiler", lambda: "c++")
    monkeypatch.setattr(module, "_command", lambda cxx, output: [cxx, "-o", str(output)])
    return module


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_interrupted_build_leaves_no_binary(build_module, tmp_path, monkeypatch):
    def interrupted_link(cmd, cxx):
        Path(cmd[-1]).write_bytes(b"half a binary")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_run_compiler", interrupted_link)
    with pytest.raises(KeyboardInterrupt):
        build_module.build(force=True)
    assert _files(tmp_path) == [] and build_module.built_binary() is None


def test_finished_build_is_renamed_into_place(build_module, tmp_path, monkeypatch):
    def link(cmd, cxx):
        Path(cmd[-1]).write_bytes(b"a binary")
        Path(cmd[-1]).chmod(0o755)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(build_module, "_run_compiler", link)
    binary = build_module.build(force=True)
    assert _files(tmp_path) == [binary] and binary.read_bytes() == b"a binary"
    import tensorflow as tf

    assert binary.parent.parent == tmp_path and binary.parent.name.startswith(f"serving_check-tf{tf.__version__}-")
    monkeypatch.setattr(build_module, "_run_compiler", lambda cmd, cxx: pytest.fail("built twice"))
    assert build_module.build() == binary  # found in the cache: no second build


def test_failed_build_is_one_line_and_leaves_nothing(build_module, tmp_path, monkeypatch):
    def failing(cmd, cxx):
        Path(cmd[-1]).write_bytes(b"junk")
        return subprocess.CompletedProcess(cmd, 1, "", "x.cc:1: error: something broke\nmore\n")

    monkeypatch.setattr(build_module, "_run_compiler", failing)
    with pytest.raises(build_module.BuildError) as error:
        build_module.build()
    assert "\n" not in str(error.value) and "error: something broke" in str(error.value)
    assert _files(tmp_path) == []


def test_cache_folder_follows_xdg_and_the_override(tmp_path, monkeypatch):
    from gbp_rewrite.deploy import serving_check_build

    monkeypatch.delenv(serving_check_build.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert serving_check_build.cache_dir() == tmp_path / "xdg" / "gbp_rewrite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert serving_check_build.cache_dir() == tmp_path / "home" / ".cache" / "gbp_rewrite"
    monkeypatch.setenv(serving_check_build.CACHE_ENV, str(tmp_path / "mine"))
    assert serving_check_build.cache_dir() == tmp_path / "mine"
    assert serving_check_build.binary_path().parent.parent == tmp_path / "mine"


def test_no_compiler_is_a_skip_that_says_why(tmp_path, monkeypatch):
    from gbp_rewrite.deploy import serving_check_build

    monkeypatch.setenv(serving_check_build.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-gbp")
    (check,) = deploy_check._cpp_checks(None, tmp_path, [])
    assert check.status == "skip" and "no C++ compiler (no-such-compiler-gbp)" in check.detail
    assert f"{cpp_check.BINARY_ENV}=none" in check.detail
    monkeypatch.setenv(cpp_check.BINARY_ENV, "none")
    (check,) = deploy_check._cpp_checks(None, tmp_path, [])
    assert check.status == "skip" and check.detail.startswith("disabled")


def test_the_cpp_source_is_package_data(tmp_path):
    """A non-editable install copies what setuptools' build_py copies: the .cc must be among it,
    and importlib.resources must find it in the package."""
    import importlib.resources
    import shutil
    import sys

    from gbp_rewrite.deploy import serving_check_build

    assert importlib.resources.files("gbp_rewrite").joinpath("cpp", "serving_check.cc").is_file()
    assert serving_check_build.source_path().read_text().count("LoadSavedModel") >= 1
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "gbp_rewrite", project / "gbp_rewrite",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                    "--build-lib", str(tmp_path / "lib")], cwd=project, check=True, capture_output=True)
    assert (tmp_path / "lib" / "gbp_rewrite" / "cpp" / "serving_check.cc").is_file()
    assert (tmp_path / "lib" / "gbp_rewrite" / "deploy" / "serving_check_build.py").is_file()


def test_verify_builds_into_the_cache_on_first_use(serving_check_binary, tmp_path):
    """The session's binary came from the default route (XDG_CACHE_HOME set by conftest), and
    verify's default finds that same binary without being told where it is."""
    import os

    assert serving_check_binary.is_relative_to(Path(os.environ["XDG_CACHE_HOME"]) / "gbp_rewrite")
    assert cpp_check.resolve_binary(None) == (serving_check_binary, "")


# ---------------------------------------------------------------------------------------------
# Copies that must not drift


def test_preprocess_flag_offers_exactly_the_preprocessing_modes():
    assert common.PREPROCESS_MODES == tuple(images.PREPROCESSING)


def test_clean_process_looks_for_what_an_export_holds(zoo):
    """clean_process cannot import gbp_rewrite (it loads conventions.py by path): the names it looks
    for must be those of a real export, checked here on one rather than against the constants that
    both sides read from conventions.py."""
    export_dir, _ = zoo.converted("shapes_cnn")
    loaded = zoo.loaded(export_dir)
    explain_class = loaded.signatures[clean_process.EXPLAIN_CLASS]
    assert clean_process.CLASS_INDEX in explain_class.structured_input_signature[1]
    assert clean_process.EXPLAINED_CLASS in explain_class.structured_outputs
    assert clean_process.EXPLAINED_CLASS in loaded.signatures["serving_default"].structured_outputs
    assert (export_dir / clean_process.REPORT_PATH).is_file()


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
    fixed, size = (None, 32, 24, 3), images.InputSpec(32, 24, tf.float32)
    assert explainer._input_spec(Path("m"), "image", tf.TensorSpec(fixed, tf.float32)) == size
    assert serving_request.image_input(
        _OneInputModel(TensorDesc("image", "image:0", tf.float32, fixed)), "s") == ("image", size)


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
