"""`gbp-rewrite verify DIR --tflite FILE --onnx FILE`: the files `convert --tflite/--onnx` wrote run in
LiteRT and onnxruntime on verify's probe batch and must give the export's outputs (the conversion's
own file check, gbp_rewrite.portable.export.check_file); a file of another model or a tampered one is
a FAIL line naming the file, exit status 1; a missing file or runtime is a one-line error."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from gbp_rewrite import cli, convert
from gbp_rewrite.portable import export as portable_export

pytest.importorskip("ai_edge_litert.interpreter", reason="needs the tflite extra")
pytest.importorskip("onnxruntime", reason="needs the onnx extra")

SOURCE = Path(__file__).parents[1] / "testdata" / "shapes_cnn"


@pytest.fixture(scope="module")
def files(tmp_path_factory, zoo):
    """The testdata CNN converted with both files, another model's files, and tampered copies."""
    root = tmp_path_factory.mktemp("verify_portable")
    convert(SOURCE, root / "export", tflite=root / "m.tflite", onnx=root / "m.onnx")
    convert(zoo.model("keras3@cnn"), root / "other", tflite=root / "other.tflite", onnx=root / "other.onnx")
    _scaled_tflite_weights(root / "m.tflite", root / "tampered.tflite")
    _scaled_onnx_weights(root / "m.onnx", root / "tampered.onnx")
    return root


def _scaled_tflite_weights(path: Path, out: Path) -> None:
    """A copy with its largest constant buffer times 1.5 (rewritten through the TFLite schema)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(path.read_bytes(), 0))
    buffer = max(model.buffers, key=lambda b: 0 if b.data is None else len(b.data))
    values = np.frombuffer(bytes(bytearray(buffer.data)), np.float32) * np.float32(1.5)
    buffer.data = np.frombuffer(values.tobytes(), np.uint8)
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out.write_bytes(bytes(builder.Output()))


def _scaled_onnx_weights(path: Path, out: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    largest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    largest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(largest) * np.float32(1.5), largest.name))
    onnx.save(model, str(out))


@pytest.fixture
def verify(monkeypatch, capsys):
    """`gbp-rewrite verify ...` in this process (the C++ loader skipped): (exit status, stdout, stderr)."""
    monkeypatch.setenv("GBP_REWRITE_SERVING_CHECK", "none")
    loggers = [logging.getLogger(), logging.getLogger("gbp_rewrite")]

    def run(*argv):
        levels = [logger.level for logger in loggers]
        try:
            status = cli.main(cli.parse_command_line(["gbp-rewrite", "verify", *map(str, argv)]))
        finally:  # main() sets the levels for a command-line run
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def _line(out: str, kind: str, path: Path) -> str:
    (line,) = [ln for ln in out.splitlines() if f"{kind} file in " in ln and str(path) in ln]
    return line


def test_fresh_files_pass(files, verify):
    status, out, err = verify(files / "export", "--tflite", files / "m.tflite", "--onnx", files / "m.onnx")
    assert status == 0, out + err
    assert "PASS" in _line(out, "tflite", files / "m.tflite") and "LiteRT runs the file" in out
    assert "PASS" in _line(out, "onnx", files / "m.onnx") and "onnxruntime runs the file" in out
    assert "result: PASS" in out


@pytest.mark.parametrize("prefix,errors", [
    # another model: another input name and size, other numbers
    ("other", {"tflite": r"LiteRT cannot run|differs from the TensorFlow export's|was it written from this export",
               "onnx": r"onnxruntime cannot run|differs from the TensorFlow export's|was it written from this export"}),
    ("tampered", {"tflite": r"LiteRT: output '\w+' of the written file differs from the TensorFlow export's",
                  "onnx": r"onnxruntime: output '\w+' of the written file differs from the TensorFlow export's"}),
])
def test_files_of_another_model_or_tampered_fail(files, verify, prefix, errors):
    tflite, onnx = files / f"{prefix}.tflite", files / f"{prefix}.onnx"
    status, out, err = verify(files / "export", "--tflite", tflite, "--onnx", onnx)
    assert status == 1
    for kind, path in (("tflite", tflite), ("onnx", onnx)):
        line = _line(out, kind, path)
        assert line.lstrip().startswith("FAIL") and re.search(errors[kind], line), out
    assert "result: FAIL (2 of" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(tflite) in lines[0] and "Traceback" not in err


def test_the_tampered_file_really_differs(files):
    """The tampered copies are not refused for being unreadable: each runs and gives other numbers."""
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    (key,) = portable_export.onnx_input_names(files / "m.onnx")
    for kind in ("tflite", "onnx"):
        run = (lambda p: portable_export.run_tflite(p, "serving_default", {key: x})) if kind == "tflite" else \
            (lambda p: portable_export.run_onnx(p, {key: x}))
        fresh, tampered = run(files / f"m.{kind}"), run(files / f"tampered.{kind}")
        assert not np.allclose(fresh["saliency"], tampered["saliency"], rtol=1e-3), kind


def test_a_missing_file_and_a_missing_runtime_are_one_line_errors(files, verify, monkeypatch):
    status, out, err = verify(files / "export", "--onnx", files / "nope.onnx")
    assert status == 1 and out == ""
    assert err.strip().count("\n") == 0 and "--onnx" in err and "nope.onnx' does not exist" in err
    real = portable_export.importlib.import_module

    def without_litert(name, *args):
        if name == "ai_edge_litert.interpreter":
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(portable_export.importlib, "import_module", without_litert)
    status, out, err = verify(files / "export", "--tflite", files / "m.tflite")
    assert status == 1 and out == ""
    assert err.strip().count("\n") == 0 and "pip install -e '.[tflite]'" in err
