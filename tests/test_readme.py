"""The README's two set-up commands: CI runs the test one verbatim, and the main job works."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

import model_zoo
from conftest import REPO, cli_command


def _sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", (REPO / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(block for block in _sh_blocks() if "pytest" in block)
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command.strip() in ci_lines


@pytest.mark.oldest
def test_readme_main_job_converts_the_shipped_model(tmp_path):
    main_command = _sh_blocks()[0]
    convert = main_command.split("&&")[-1].strip()
    argv = shlex.split(convert)
    assert argv[:2] == [".venv/bin/gbp-rewrite", "convert"] and argv[2] == "testdata/shapes_cnn"
    destination = tmp_path / "explainable"
    shipped = model_zoo.tree_digest(REPO / argv[2])
    result = subprocess.run(cli_command(*argv[1:3], destination, *argv[4:]), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert model_zoo.tree_digest(REPO / argv[2]) == shipped, "converting changed the shipped model"
    assert "3 rewritten" in result.stdout
    assert (destination / "saved_model.pb").exists()
    assert (destination / "assets" / "gbp_rewrite_report.json").exists()
