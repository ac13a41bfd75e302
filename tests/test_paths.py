"""Paths (issue #7): a destination that is, lies inside or contains the source is refused with a clear
message; relative paths, spaces, non-ASCII characters and symlinked sources work."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import tensorflow as tf

import gbp_rewrite
import model_zoo
from conftest import cli_command, run_cli_concurrently
from gbp_rewrite.graph import savedmodel
from gbp_rewrite.errors import OutputError

MODEL = "tf2_module@cnn"


@pytest.fixture
def source(zoo, tmp_path):
    """A private copy of a small model (these tests put things next to and inside it)."""
    copy = tmp_path / "model"
    shutil.copytree(zoo.model(MODEL), copy)
    return copy


def _refused(source, destination, *, overwrite=False) -> str:
    before = model_zoo.tree_digest(source)
    with pytest.raises(OutputError) as error:
        gbp_rewrite.convert(source, destination, overwrite=overwrite)
    assert model_zoo.tree_digest(source) == before
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overwrite", [False, True])
def test_destination_equal_to_the_source_is_refused(source, overwrite):
    assert "the source itself" in _refused(source, source, overwrite=overwrite)
    assert "the source itself" in _refused(source, source.parent / ".." / source.parent.name / "model",
                                           overwrite=overwrite)


def test_destination_inside_the_source_is_refused(source):
    message = _refused(source, source / "explainable")
    assert "inside the source" in message and "outside the source" in message
    assert not (source / "explainable").exists()


def test_destination_containing_the_source_is_refused(source):
    assert "would delete the source" in _refused(source, source.parent)
    assert "would delete the source" in _refused(source, source.parent, overwrite=True)


def test_symlink_to_the_source_is_refused(source, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(source, target_is_directory=True)
    assert "the source itself" in _refused(source, link, overwrite=True)
    assert "inside the source" in _refused(source, link / "sub")


def test_destination_that_is_a_file_is_refused(source, tmp_path):
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    assert "already exists" in _refused(source, existing)
    assert "not a directory" in _refused(source, existing, overwrite=True)
    assert existing.read_text() == "keep me"


def test_relative_paths_spaces_non_ascii_and_a_symlinked_source(source, tmp_path, monkeypatch):
    folder = tmp_path / "modèles à tester ☃"
    shutil.copytree(source, folder / "mödel ünï")
    (tmp_path / "lïnk to mödel").symlink_to(folder / "mödel ünï", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for src, dst in ((f"{folder.name}/mödel ünï", "ëxports/out put"), ("lïnk to mödel", "ëxports/from link")):
        report = gbp_rewrite.convert(src, dst)
        assert report.source == src and report.destination == dst
        assert (tmp_path / dst / "saved_model.pb").is_file()
        loaded = tf.saved_model.load(dst)
        assert {"serving_default", "explain_class"} <= set(loaded.signatures)
        assert "inside the source" in _refused(src, f"./{src}/sub")
    assert sorted(os.listdir(tmp_path / "ëxports")) == ["from link", "out put"], "temporary directories left"


def test_command_line_paths(source, tmp_path):
    """Non-ASCII and spaces in argv (relative to the working directory), and a refused destination."""
    folder = tmp_path / "dössier avec espaces"
    shutil.copytree(source, folder / "mödel")
    before = model_zoo.tree_digest(folder / "mödel")
    done = run_cli_concurrently({
        "converted": cli_command("convert", "dössier avec espaces/mödel", "sörtie/ëxport un", "--json"),
        "refused": cli_command("convert", "dössier avec espaces/mödel", "dössier avec espaces/mödel/x"),
    }, cwd=tmp_path)
    converted, refused = done["converted"], done["refused"]
    assert converted.returncode == 0, converted.stderr
    assert json.loads(converted.stdout)["destination"] == "sörtie/ëxport un"
    assert savedmodel.read(tmp_path / "sörtie" / "ëxport un").signature("explain_class")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert "inside the source" in lines[0] and "mödel/x" in lines[0]
    assert not (folder / "mödel" / "x").exists()
    assert model_zoo.tree_digest(folder / "mödel") == before


def test_the_source_check_fails_when_a_conversion_touches_the_source(source, tmp_path, monkeypatch):
    """The autouse guard in conftest.py (every convert call leaves its source unchanged) can fail."""
    read = savedmodel.read

    def read_and_scribble(path):
        (source / "variables" / "variables.index").write_bytes(b"scribbled")
        return read(path)

    monkeypatch.setattr(savedmodel, "read", read_and_scribble)
    with pytest.raises(AssertionError, match="changed the source"):
        gbp_rewrite.convert(source, tmp_path / "out")
