"""Every bad input of the converter issue, through the command line: exit status 1, a one-line
error that names the problem, no traceback, and no output directory left behind."""

from __future__ import annotations

import shutil
import subprocess
import sys

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
    for argv in (["convrt", "a", "b"], ["convert", "a"], ["convert", "a", "b", "--rule", "bogus"], ["inspect", "a", "--rule", "guided"],
                 ["convert", "a", "b", "--saliency_map_dtype", "int8"],
                 ["convert", "a", "b", "--preprocess", "caffe"]):  # --preprocess needs --image_bytes_signature
        result = subprocess.run(cli_command(*argv), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (argv, result.stderr)
        assert "usage error" in result.stderr and "Traceback" not in result.stderr


_NO_TENSORFLOW = """
import sys
from gbp_rewrite import cli
try:
    cli.main(cli.parse_command_line(["gbp-rewrite", *sys.argv[1:]]))
except SystemExit as e:
    print("exit", e.code, "tensorflow imported" if "tensorflow" in sys.modules else "no tensorflow")
"""


@pytest.mark.parametrize("argv", [
    ["convert", "a", "b", "--preprocess", "caffe"], ["explain", "m", "--out", "o"],
    ["explain", "m", "--glob", "*.png", "--out", "o"], ["request", "m"], ["decode", "r"],
    ["sanity", "m", "--dir", "d"],
], ids=lambda argv: " ".join(argv))
def test_usage_errors_answer_before_tensorflow_is_imported(argv):
    """A flag combination the command refuses is a usage error (exit 2) from check_usage, before
    the seconds TensorFlow's import takes."""
    result = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, *argv], capture_output=True, text=True,
                            timeout=120)
    assert "usage error" in result.stderr, result.stderr
    assert result.stdout.split() == ["exit", "2", "no", "tensorflow"], result.stdout


# ---------------------------------------------------------------------------------------------
# The command line's structure: per-command help, accumulating list flags, bare command


def _help(*argv):
    return subprocess.run(cli_command(*argv), capture_output=True, text=True, timeout=120)


def test_bare_command_exits_2_with_the_command_list():
    result = _help()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for command in ("inspect", "convert", "explain", "verify", "request", "decode"):
        assert f"\n    {command} " in result.stderr, command


@pytest.mark.parametrize("command,own,foreign", [
    ("convert", ["--layers NAME", "--rule {guided,deconvnet,vanilla}", "--signature KEY", "--serving_version N|next",
                 "--nofold_batchnorms", "--image_bytes_signature", "--preprocess {unit,symmetric,caffe,none}",
                 "--saliency_map_dtype {float32,uint8}", "--saliency_png"],
     ["--image", "--dir", "--source", "--batch_size", "--grpc"]),
    ("explain", ["--image PATH", "--dir FOLDER", "--out OUTDIR", "--class N", "--batch_size N",
                 "--preprocess {unit,symmetric,caffe,none}"], ["--layers", "--rule", "--source", "--signature"]),
    ("inspect", ["--signature KEY", "--json", "--unsafe_deserialization"], ["--layers", "--image", "--out"]),
    ("verify", ["--source SRC", "--json", "--allow_file_ops"], ["--layers", "--image", "--signature"]),
    ("request", ["--image PATH", "--signature KEY", "--out FILE", "--grpc", "--model_name NAME"],
     ["--layers", "--dir", "--source"]),
    ("decode", ["--out DIR", "--image PATH", "--grpc"], ["--layers", "--signature", "--source"]),
])
def test_each_command_help_lists_its_own_flags_with_their_values(command, own, foreign):
    for argv in ([command, "--help"], ["help", command]):
        result = _help(*argv)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: gbp-rewrite {command} ")
        for flag in own:
            assert flag in result.stdout, (flag, result.stdout)
        for flag in foreign:
            assert f"{flag} " not in result.stdout and f"[{flag}]" not in result.stdout, (flag, result.stdout)
        assert len(result.stdout.splitlines()) < 110  # about two screens (convert's is the longest)


def test_repeated_list_flags_accumulate(zoo, tmp_path):
    """--layers relu1 --layers relu6_2 rewrites both (absl's list flag kept only the last);
    --layers relu1,relu6_2 means the same."""
    import json

    model = zoo.model("keras3@cnn")
    runs = run_cli_concurrently({
        "repeated": cli_command("convert", model, tmp_path / "repeated", "--layers", "relu1", "--layers", "relu6_2", "--json"),
        "comma": cli_command("convert", model, tmp_path / "comma", "--layers", "relu1,relu6_2", "--json"),
        "one": cli_command("convert", model, tmp_path / "one", "--layers", "relu6_2", "--json"),
    })
    rewritten = {}
    for name, done in runs.items():
        assert done.returncode == 0, done.stderr
        rewritten[name] = sorted(s["layer"] for s in json.loads(done.stdout)["sites"] if s["status"] == "rewritten")
    assert rewritten["repeated"] == rewritten["comma"] == ["relu1", "relu6_2"]
    assert rewritten["one"] == ["relu6_2"]


@pytest.mark.parametrize("command", ["explain", "sanity"])
@pytest.mark.parametrize("sources", [[], ["--image", "a.png", "--dir", "images"]])
def test_images_come_from_either_image_or_dir(command, sources):
    from gbp_rewrite.cli import COMMANDS, parse_command_line
    from gbp_rewrite.cli.common import UsageError

    args = parse_command_line(["gbp-rewrite", command, "model", "--out", "out", *sources])
    with pytest.raises(UsageError, match=rf"^'{command}' takes the images with either --image or --dir"):
        COMMANDS[command].check_usage(args)
