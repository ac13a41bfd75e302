"""`verify`: prove an export runs where users deploy it, without gbp_rewrite.

    verify_export(DIR, source=SRC)
      -> a clean Python process (gbp_rewrite not importable, cwd outside the repository, no
         PYTHONPATH) runs clean_process.py: op audit, load, every signature on a probe batch,
         REST row-format shape check, saliency finite and not all zero, predictions vs the source
      -> the C++ loader (gbp_rewrite/cpp/serving_check.cc, TF Serving's LoadSavedModel + Session::Run) runs
         every signature on the same probe inputs; its outputs must equal Python's
      -> with tflite=/onnx= (files `convert --tflite/--onnx` wrote beside the export): each file
         runs in its runtime (LiteRT, onnxruntime) on the same probe inputs, and every output must
         match the export's, as the conversion's own self-check requires (gbp_rewrite.portable.export)
      -> a DeployReport: one pass/fail/skip line per check, saying why TF Serving would fail.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gbp_rewrite.deploy import cpp_check
from gbp_rewrite.keras import loading as keras_loading
from gbp_rewrite import security
from gbp_rewrite.errors import SourceModelError, VerificationError

log = logging.getLogger(__name__)

CHILD_TIMEOUT = 1800
CPP_CHECK = "C++ loader (LoadSavedModel + Session::Run)"
WHY_CPP = "this is the loader and runner TF Serving uses; the model server would fail the same way"
WHY_FILE = ("the file does not compute what this export computes: convert again with --tflite/--onnx and "
            "ship the files together")

# The script the clean process runs: a file of this package, run without the package (see its docstring).
CLEAN_PROCESS = Path(__file__).with_name("clean_process.py")

# Runs in the child before anything else: make gbp_rewrite unimportable, then run the script.
_BOOTSTRAP = (
    "import sys\n"
    "sys.modules['gbp_rewrite'] = None\n"
    "script = sys.argv[1]\n"
    "sys.argv = sys.argv[1:]\n"
    "code = compile(open(script, encoding='utf-8').read(), script, 'exec')\n"
    "exec(code, {'__name__': '__main__', '__file__': script})\n"
)


@dataclasses.dataclass
class Check:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str
    why: str = ""  # what TF Serving would do, for failures


@dataclasses.dataclass
class DeployReport:
    """The result of `verify_export`: one line per check, and the op types the graph uses."""

    export_dir: str
    source: str | None
    checks: list[Check]
    op_types: dict[str, int]
    facts: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def check(self, name: str) -> Check:
        """The check called `name` (KeyError when there is none)."""
        for item in self.checks:
            if item.name == name:
                return item
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def to_text(self) -> str:
        title = f"verify {self.export_dir}" + (f" against {self.source}" if self.source else "")
        lines = [title]
        for item in self.checks:
            lines.append(f"  {item.status.upper():<4}  {item.name}: {item.detail}")
            if item.why:
                lines.append(f"        why: {item.why}")
        if self.op_types:
            lines.append(f"  op types ({len(self.op_types)}): {', '.join(self.op_types)}")
        if self.facts.get("written_by_tensorflow"):
            lines.append(f"  written by TensorFlow {self.facts['written_by_tensorflow']}: serve it with "
                         "tensorflow/serving of that version or newer (older servers may lack its ops)")
        failed = len(self.failures)
        lines.append(f"result: {'FAIL' if failed else 'PASS'} ({failed} of {len(self.checks)} checks failed)"
                     if failed else f"result: PASS ({len(self.checks)} checks)")
        return "\n".join(lines)

    def failure_summary(self) -> str:
        """One line for the command line's error message."""
        first = self.failures[0]
        return (f"{len(self.failures)} of {len(self.checks)} checks failed (listed above); first, "
                f"{first.name}: {first.detail}" + (f" - {first.why}" if first.why else ""))


def verify_export(
    export_dir: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    serving_check: str | os.PathLike | bool | None = None,
    batch: int = 2,
    seed: int = 0,
    allow_file_ops: bool = False,
    tflite: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
) -> DeployReport:
    """Check that the SavedModel `export_dir` runs without gbp_rewrite, as TF Serving would run it.

    Args:
      export_dir: the SavedModel to check (usually a `convert` output; any SavedModel works).
      source: the source model (a SavedModel directory, or a .keras/.h5 file, exported here by
        Keras' model.export): each signature's predictions must equal the source's signature of
        the same key on the same probe inputs (explain_class: the explained one).
      serving_check: the C++ serving check binary (default: $GBP_REWRITE_SERVING_CHECK, else the
        one gbp_rewrite.deploy.serving_check_build builds into the user cache on first use, about a
        minute with g++); False or $GBP_REWRITE_SERVING_CHECK=none skips the C++ check, and so
        does a binary that is not built or a build that fails (the SKIP line says why).
      batch: probe batch size. seed: seed of the probe inputs (uniform in [0, 1)).
      allow_file_ops: run models whose graphs reach files or the network outside the standard
        savers (refused by default, as by `convert`: verifying runs them).
      tflite: a .tflite file written from this export (`convert --tflite`): it must run in LiteRT
        and give the export's outputs on the probe inputs, within the conversion self-check's
        tolerance. Needs the 'tflite' extra.
      onnx: the same for an .onnx file (`convert --onnx`), in onnxruntime. Needs the 'onnx' extra.

    Returns:
      The report; `report.ok` is False when any check failed (this function does not raise for
      failed checks, only when the check itself cannot run).
    """
    export_dir = Path(export_dir).resolve()
    _require_savedmodel(export_dir, "the model to verify")
    files = _portable_files(tflite=tflite, onnx=onnx)
    security.check_savedmodel(export_dir, allow=allow_file_ops, action="verifying it")
    work = Path(tempfile.mkdtemp(prefix="gbp_rewrite_verify_"))
    try:
        source_dir = _source_savedmodel(source, work)
        if source_dir is not None:
            security.check_savedmodel(source_dir, allow=allow_file_ops, action="verifying against it")
        result = _run_clean_process(export_dir, source_dir, work, batch=batch, seed=seed)
        checks = [Check(**item) for item in result["checks"]]
        checks.extend(_cpp_checks(serving_check, export_dir, result["signatures"]))
        nudged: dict = {}  # one per signature, shared by the .tflite and .onnx
        checks.extend(_file_check(kind, path, export_dir, result["signatures"], nudged)
                      for kind, path in files.items())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DeployReport(str(export_dir), str(source) if source is not None else None, checks,
                        result["op_types"], result["facts"])


def _portable_files(*, tflite, onnx) -> dict[str, Path]:
    """The .tflite/.onnx files to check beside the export: each must exist, and its runtime (an
    optional extra) be installed; a one-line error otherwise, before anything runs."""
    from gbp_rewrite.portable import export as portable_export

    files = {kind: Path(path) for kind, path in (("tflite", tflite), ("onnx", onnx)) if path is not None}
    for kind, path in files.items():
        if path.is_dir():
            raise SourceModelError(f"--{kind} '{path}' is a directory; give the file `convert --{kind}` wrote")
        if not path.is_file():
            raise SourceModelError(f"--{kind} '{path}' does not exist")
    portable_export.require_extras(tflite="tflite" in files, onnx="onnx" in files)
    return files


def _file_check(kind: str, path: Path, export_dir: Path, signatures: list[dict], nudged: dict) -> Check:
    """The .tflite/.onnx file at `path` on the clean process's probe inputs of the export's
    signature it was written from, against that signature's outputs (the conversion's check,
    kink flips included: the export at `export_dir` gives the nudged runs when one is needed)."""
    from gbp_rewrite.portable import export as portable_export

    runtime = portable_export.RUNTIMES[kind]
    name = f"{kind} file in {runtime}: {path}"
    ran = {s["key"]: s for s in signatures if s["outputs"]}
    try:
        if kind == "tflite":
            keys = portable_export.tflite_signatures(path)
            matching = [k for k in keys if k in ran]
            wanted = f"a signature of the export (it has {', '.join(keys) or 'none'})"
        else:
            inputs = set(portable_export.onnx_input_names(path))
            matching = [k for k, s in ran.items() if set(s["inputs"]) == inputs]
            wanted = f"inputs named as a signature's of the export (it has {', '.join(sorted(inputs))})"
        if not matching:
            raise VerificationError(f"the file has no {wanted}: was it written from this export?")
        key = "serving_default" if "serving_default" in matching else matching[0]
        signature = ran[key]
        probe = {k: np.load(p) for k, p in signature["inputs"].items()}
        expected = {k: np.load(p) for k, p in signature["outputs"].items()}
        if key not in nudged:  # TensorFlow's nudged runs are made once per signature, when needed
            nudged[key] = portable_export.NudgedReference(export_dir, signature=key, probe=probe)
        detail = portable_export.check_file(kind, path, signature=key, probe=probe, expected=expected,
                                            nudged=nudged[key])
    except VerificationError as e:
        return Check(name, "fail", str(e), WHY_FILE)
    return Check(name, "pass", f"{key}: {detail}")



def _source_savedmodel(source, work: Path) -> Path | None:
    """The source as a SavedModel directory; a .keras/.h5 file is exported by Keras itself."""
    if source is None:
        return None
    if keras_loading.is_keras_source(source):
        # Served as `convert` serves a Keras file: with the signature model.export gives it.
        directory = work / "source_export"
        keras_loading.load(source).model.export(str(directory), verbose=False)
        return directory
    source_dir = Path(source).resolve()
    _require_savedmodel(source_dir, "--source")
    return source_dir


def _require_savedmodel(path: Path, what: str) -> None:
    if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
        return
    if not path.exists():
        raise SourceModelError(f"{what} '{path}' does not exist")
    versions = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()) if path.is_dir() else []
    if versions:
        raise SourceModelError(
            f"{what} '{path}' is a TF Serving base path with versions {', '.join(map(str, versions))}; "
            f"verify one version, e.g. '{path / str(versions[-1])}'"
        )
    raise SourceModelError(
        f"{what} '{path}' is not a SavedModel directory (no saved_model.pb); pass the directory "
        "written by `gbp-rewrite convert` or tf.saved_model.save"
    )


def _clean_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _run_clean_process(export_dir: Path, source_dir: Path | None, work: Path, *, batch: int, seed: int) -> dict:
    package_parent = str(Path(__file__).resolve().parents[1])
    config = {
        "export_dir": str(export_dir),
        "source_dir": str(source_dir) if source_dir else None,
        "work_dir": str(work),
        "batch": int(batch),
        "seed": int(seed),
        "forbidden_paths": [package_parent],
    }
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    # -I: ignore PYTHON* variables and the user's site-packages, and keep the cwd off sys.path.
    command = [sys.executable, "-I", "-c", _BOOTSTRAP, str(CLEAN_PROCESS), str(config_path)]
    log.info("running the clean check: %s", " ".join(command[:2] + ["-c", "...", *command[4:]]))
    try:
        proc = subprocess.run(command, cwd=work, env=_clean_environment(), capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise VerificationError(f"the clean verification process did not finish within {CHILD_TIMEOUT} s") from None
    result_path = work / "result.json"
    if not result_path.is_file():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise VerificationError(f"the clean verification process died (exit status {proc.returncode}): {tail}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    if "crash" in result:
        log.info("clean check traceback:\n%s", result.get("traceback", ""))
        raise VerificationError(f"the clean verification process failed: {result['crash']}")
    return result


def _cpp_checks(binary_option, export_dir: Path, signatures: list[dict]) -> list[Check]:
    """One check per signature: C++ on the probe inputs; outputs equal Python's when Python ran."""
    binary, why_not = cpp_check.resolve_binary(binary_option)
    if binary is None:
        return [Check(CPP_CHECK, "skip", why_not)]
    checks = []
    for signature in signatures:
        name = f"{CPP_CHECK}: {signature['key']}"
        if any(os.sep in key or key.startswith(".") for key in signature["outputs"]):
            checks.append(Check(name, "skip", "an output key is not a file name"))
            continue
        python_outputs = {k: np.load(path) for k, path in signature["outputs"].items()}
        inputs = {k: Path(p) for k, p in signature["inputs"].items()}
        ok, detail = cpp_check.check_signature(binary, export_dir, signature["key"], inputs,
                                               python_outputs or None)
        checks.append(Check(name, "pass" if ok else "fail", detail, "" if ok else WHY_CPP))
    return checks
