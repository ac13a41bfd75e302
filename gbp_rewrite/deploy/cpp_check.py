"""Run a signature through the C++ serving check: TensorFlow's C++ SavedModel loader, as TF Serving.

The binary (built from gbp_rewrite/cpp/serving_check.cc against the tensorflow wheel's
libtensorflow_cc, by gbp_rewrite.deploy.serving_check_build into a user cache folder on first use) calls
`LoadSavedModel(..., {"serve"})` and `Session::Run` on a SignatureDef's tensor names: TF Serving's
own path, with no Python at all. This module finds (or builds) the binary, runs it on .npy inputs
and compares its outputs with the ones Python computed on the same inputs.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from gbp_rewrite.deploy import serving_check_build

BINARY_ENV = "GBP_REWRITE_SERVING_CHECK"
DISABLED = "none"  # GBP_REWRITE_SERVING_CHECK=none: skip the C++ check (e.g. no g++ on purpose)
RUN_TIMEOUT = 600

# The C++ and Python runs execute the same graph with the same kernels; they may differ only where
# the runtimes fuse ops differently.
TOLERANCE = 1e-6

_ERROR_PREFIX = "serving_check: error: "


class CppCheckError(Exception):
    """The binary failed: the one-line reason it printed."""


def binary_candidate(binary: str | os.PathLike | None = None) -> Path:
    """Where the serving_check binary should be: `binary`, else $GBP_REWRITE_SERVING_CHECK, else
    the cache build (whether or not it is there)."""
    chosen = binary or os.environ.get(BINARY_ENV)
    return Path(chosen) if chosen else serving_check_build.binary_path()


def find_binary(binary: str | os.PathLike | None = None) -> Path | None:
    """The serving_check binary at binary_candidate(binary), or None when it is not built."""
    candidate = binary_candidate(binary)
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def resolve_binary(binary: str | os.PathLike | bool | None = None) -> tuple[Path | None, str]:
    """(the binary to run, '') or (None, why the C++ check is skipped).

    `binary` (or $GBP_REWRITE_SERVING_CHECK) names a binary, which is used as it is; False (or
    $GBP_REWRITE_SERVING_CHECK=none) skips the check; otherwise the cache build is used, built
    first when it is missing (about a minute, once per TensorFlow version).
    """
    if binary is False or (binary is None and os.environ.get(BINARY_ENV) == DISABLED):
        return None, f"disabled ({BINARY_ENV}={DISABLED} or serving_check=False)"
    if binary is True:
        binary = None
    if binary or os.environ.get(BINARY_ENV):
        found = find_binary(binary)
        if found is None:
            return None, (f"{binary_candidate(binary)} is not built; name no binary (serving_check, "
                          f"${BINARY_ENV}) to build the serving check into the cache on first use")
        return found, ""
    try:
        return serving_check_build.build(), ""
    except serving_check_build.BuildError as e:
        return None, f"{e}; or set {BINARY_ENV}={DISABLED} to skip this check"


def run_signature(
    binary: Path, export_dir: Path, signature: str, inputs: Mapping[str, Path], out_dir: Path,
    keys: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run `signature` of `export_dir` on the .npy `inputs`; return its outputs by key.

    `keys`: the outputs to read (those the binary did not write are left out); None reads every
    output the binary lists.
    """
    command = [str(binary), "--model", str(export_dir), "--signature", signature,
               "--output_dir", str(out_dir)]
    for key, path in inputs.items():
        command += ["--input", f"{key}={path}"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CppCheckError(f"no answer within {RUN_TIMEOUT} s") from None
    if proc.returncode != 0:
        errors = [line[len(_ERROR_PREFIX):] for line in proc.stderr.splitlines()
                  if line.startswith(_ERROR_PREFIX)]
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CppCheckError(errors[0] if errors else f"exit status {proc.returncode}: {tail}")
    if keys is None:
        keys = _listed_keys(proc.stdout)
    return {key: np.load(path) for key in keys if (path := out_dir / f"{key}.npy").is_file()}


def _listed_keys(stdout: str) -> list[str]:
    """The output keys of the binary's summary, one line each: `<key> <dtype> <shape>`.

    A key may contain spaces; the dtype and the shape ("[2,4]") never do.
    """
    return [line.rsplit(" ", 2)[0] for line in stdout.splitlines() if line.strip()]


def compare(cpp: Mapping[str, np.ndarray], python: Mapping[str, np.ndarray]) -> tuple[bool, str]:
    """Same keys, dtypes and shapes; floats within TOLERANCE (absolute and relative), others equal."""
    if sorted(cpp) != sorted(python):
        return False, f"output keys differ: C++ {sorted(cpp)}, Python {sorted(python)}"
    worst, problems = 0.0, []
    for key, want in python.items():
        got = cpp[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            problems.append(f"{key} is {got.dtype}{list(got.shape)} in C++, {want.dtype}{list(want.shape)} in Python")
        elif np.issubdtype(want.dtype, np.floating):
            if want.size:
                worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))))
            if not np.allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True):
                problems.append(f"{key} differs by more than {TOLERANCE:g}")
        elif not np.array_equal(got, want):
            problems.append(f"{key} differs")
    if problems:
        return False, "; ".join(problems)
    return True, f"outputs equal Python's (max abs difference {worst:.3g})"


def check_signature(
    binary: Path, export_dir: Path, signature: str,
    inputs: Mapping[str, Path], python_outputs: Mapping[str, np.ndarray] | None,
) -> tuple[bool, str]:
    """Run one signature in C++ on `inputs` and compare with `python_outputs`: (ok, one line).

    `python_outputs` None means Python could not run the signature: then only C++ running counts.
    The C++ outputs read are the keys Python produced (file names, unlike the binary's summary
    lines, need no parsing).
    """
    with tempfile.TemporaryDirectory(prefix="gbp_rewrite_cpp_") as out_dir:
        try:
            cpp = run_signature(binary, export_dir, signature, inputs, Path(out_dir), keys=python_outputs or ())
        except CppCheckError as e:
            return False, f"failed: {e}"
        if python_outputs is None:
            return True, "runs in C++ (Python could not run it, see above)"
        return compare(cpp, python_outputs)
