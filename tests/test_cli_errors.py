"""Every bad input of the converter issue, through the command line: exit status 1, a one-line
error that names the problem, no traceback, and no output directory left behind."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import model_zoo
from conftest import cli_command, run_cli_concurrently


def _damaged_models(zoo, root):
    """name -> (argv, words the one-line error must contain)."""
    good = zoo.model("keras3@cnn")
    cases = {}

    def copy(name):
        target = root / name
        shutil.copytree(good, target)
        return target

    missing_pb = root / "no_pb"
    missing_pb.mkdir()
    (missing_pb / "notes.txt").write_text("not a model")
    corrupt = copy("corrupt_pb")
    (corrupt / "saved_model.pb").write_bytes(b"\x0a\xff\xff\xff\xff\x0fgarbage" * 50)
    truncated = copy("truncated_pb")
    data = (truncated / "saved_model.pb").read_bytes()
    (truncated / "saved_model.pb").write_bytes(data[: len(data) // 2])
    short_variables = copy("truncated_variables")
    (shard,) = (short_variables / "variables").glob("variables.data-*")
    shard.write_bytes(shard.read_bytes()[:100])
    existing = root / "existing_dst"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")

    cases["missing path"] = (["convert", root / "does_not_exist"], ["no such file or directory"])
    cases["no saved_model.pb"] = (["convert", missing_pb], ["no saved_model.pb"])
    cases["corrupt saved_model.pb"] = (["convert", corrupt], ["corrupt or truncated"])
    cases["truncated saved_model.pb"] = (["convert", truncated], ["saved_model.pb"])
    cases["truncated variables"] = (["convert", short_variables], ["variables"])
    cases["unknown signature"] = (["convert", good, "--signature", "predict"], ["'predict'", "serving_default"])
    cases["no relu"] = (["convert", zoo.model("no_relu")], ["no ReLU", "Sigmoid"])
    cases["unknown layer"] = (["convert", good, "--layers", "conv9"], ["'conv9'", "relu1"])
    cases["integer input"] = (["convert", zoo.model("int_input")], ["int32", "float input"])
    cases["string input"] = (["convert", zoo.model("string_input")], ["string", "float input"])
    cases["existing destination"] = (["convert", good, "@existing"], ["already exists", "--overwrite"])
    return cases, existing


@pytest.fixture(scope="module")
def results(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    cases, existing = _damaged_models(zoo, root)
    sources = {name: argv[1] for name, (argv, _) in cases.items()}
    digests = {name: model_zoo.tree_digest(src) for name, src in sources.items() if src.exists()}
    commands, destinations = {}, {}
    for index, (name, (argv, _)) in enumerate(cases.items()):
        destination = existing if "@existing" in argv else root / f"out_{index}"
        argv = [str(destination) if a == "@existing" else a for a in argv]
        if "@existing" not in cases[name][0]:
            argv.insert(2, str(destination))
        commands[name], destinations[name] = cli_command(*argv), destination
    outcome = {name: (done.returncode, done.stdout, done.stderr, destinations[name])
               for name, done in run_cli_concurrently(commands).items()}
    return cases, outcome, digests, sources, existing


CASE_NAMES = [
    "missing path", "no saved_model.pb", "corrupt saved_model.pb", "truncated saved_model.pb",
    "truncated variables", "unknown signature", "no relu", "unknown layer", "integer input",
    "string input", "existing destination",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_fails_cleanly(results, name):
    cases, outcome, digests, sources, existing = results
    status, out, err, destination = outcome[name]
    assert status == 1, f"exit {status}; stderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err}"
    assert lines[0].startswith("gbp-rewrite: error: ")
    for word in cases[name][1]:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    if name == "existing destination":
        assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    else:
        assert not destination.exists()
    assert not list(destination.parent.glob(f".{destination.name}.gbp-*")), "a temporary directory was left"
    if name in digests:
        assert model_zoo.tree_digest(sources[name]) == digests[name], "the source was modified"


def test_usage_errors_exit_2():
    for argv in (["convrt", "a", "b"], ["convert", "a"], ["convert", "a", "b", "--rule", "bogus"], ["inspect", "a", "--rule", "guided"]):
        result = subprocess.run(cli_command(*argv), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (argv, result.stderr)
        assert "usage error" in result.stderr and "Traceback" not in result.stderr
