"""Build the serving_check C++ binary against the installed tensorflow wheel.

Usage (with the project's venv python):

    python tools/serving_check/build.py [--force]

Compiles serving_check.cc with g++ using the flags from ``tf.sysconfig`` and
links it against ``libtensorflow_cc.so.2`` / ``libtensorflow_framework.so.2``
shipped in the wheel.  The binary goes to ``tools/serving_check/build/``
(linked under a temporary name and renamed into place, so an interrupted
build never leaves a partial executable there) and a stamp file next to it
records the tensorflow version and the command; the build is skipped when the
binary is newer than the source and the stamp still matches.

Importable API::

    build(*, force=False) -> pathlib.Path   # raises BuildError on failure
    binary_path() -> pathlib.Path | None    # None if not built yet
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "serving_check.cc"
BUILD_DIR = HERE / "build"
BINARY = BUILD_DIR / "serving_check"
STAMP = BUILD_DIR / "serving_check.stamp.json"

_EXTRA_CXXFLAGS = [
    "-O2",
    # The TF headers trigger hundreds of these with g++ 12.
    "-Wno-deprecated-declarations",
    "-Wno-interference-size",
]


class BuildError(RuntimeError):
    """Raised when the compiler is missing or the compilation fails."""


def binary_path() -> pathlib.Path | None:
    """Path of the built binary, or None if it has not been built."""
    if BINARY.is_file() and os.access(BINARY, os.X_OK):
        return BINARY
    return None


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    found = shutil.which(cxx)
    if found is None:
        raise BuildError(
            f"C++ compiler {cxx!r} not found on PATH; install g++ "
            "(e.g. `apt-get install g++`) or set CXX"
        )
    return found


def _tf_version() -> str:
    """Installed tensorflow version, without importing tensorflow if possible."""
    try:
        from importlib import metadata

        for dist in metadata.packages_distributions().get("tensorflow", []):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    except Exception:  # pragma: no cover - exotic installs
        pass
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    return tf.__version__


def _command(cxx: str, output: pathlib.Path) -> list[str]:
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise BuildError(f"cannot import tensorflow: {e}") from e

    compile_flags = list(tf.sysconfig.get_compile_flags())
    link_flags = list(tf.sysconfig.get_link_flags())
    lib_dir = pathlib.Path(tf.sysconfig.get_lib())
    if not any(f.lstrip("-").startswith("std=") for f in compile_flags):
        compile_flags.append("-std=c++17")

    # The wheel ships libtensorflow_cc.so.2, usually without an unversioned
    # symlink, so name the file explicitly.
    cc_libs = sorted(lib_dir.glob("libtensorflow_cc.so*"))
    if not cc_libs:
        raise BuildError(f"libtensorflow_cc.so* not found in {lib_dir}")
    cc_lib = min(cc_libs, key=lambda p: (p.name != "libtensorflow_cc.so.2", p.name))

    return [
        cxx,
        *compile_flags,
        *_EXTRA_CXXFLAGS,
        str(SOURCE),
        "-o",
        str(output),
        # Without --no-as-needed the linker drops libtensorflow_cc (nothing
        # references its symbols directly), so the DirectSession factory is
        # never registered: "No session factory registered".
        "-Wl,--no-as-needed",
        *link_flags,
        f"-l:{cc_lib.name}",
        f"-Wl,-rpath,{lib_dir}",
    ]


def _run_compiler(cmd: list[str], cxx: str) -> subprocess.CompletedProcess:
    """Run the compile-and-link command; a compiler that cannot start is a BuildError."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise BuildError(f"cannot run {cxx}: {e}") from e


def _read_stamp() -> dict:
    try:
        return json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return {}


def _up_to_date(tf_version: str) -> bool:
    if binary_path() is None:
        return False
    if BINARY.stat().st_mtime <= SOURCE.stat().st_mtime:
        return False
    return _read_stamp().get("tensorflow_version") == tf_version


def build(*, force: bool = False) -> pathlib.Path:
    """Compile serving_check if needed and return the binary's path."""
    if not SOURCE.is_file():
        raise BuildError(f"source file missing: {SOURCE}")
    tf_version = _tf_version()
    if not force and _up_to_date(tf_version):
        return BINARY

    cxx = _compiler()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # Same directory as BINARY, so os.replace is an atomic rename.
    partial = BUILD_DIR / f".{BINARY.name}.{os.getpid()}.tmp"
    cmd = _command(cxx, partial)
    # Invalidate first so an interrupted build is never taken as up to date.
    STAMP.unlink(missing_ok=True)
    print(shlex.join(cmd), flush=True)
    start = time.monotonic()
    try:
        proc = _run_compiler(cmd, cxx)
        if proc.returncode == 0:
            os.replace(partial, BINARY)
    finally:
        partial.unlink(missing_ok=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        # A failed build must not leave an older binary to be taken for this source's.
        BINARY.unlink(missing_ok=True)
        errors = [
            l
            for l in proc.stderr.splitlines()
            if "error:" in l or "undefined reference" in l
        ]
        detail = "\n".join(errors[:20]) or proc.stderr[-4000:]
        raise BuildError(
            f"compilation failed (exit {proc.returncode}) after {elapsed:.1f}s:\n"
            f"{detail}"
        )
    STAMP.write_text(
        json.dumps(
            {
                "tensorflow_version": tf_version,
                "command": cmd,
                "build_seconds": round(elapsed, 1),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"built {BINARY} in {elapsed:.1f}s", flush=True)
    return BINARY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if up to date"
    )
    args = parser.parse_args(argv)
    try:
        was_fresh = not args.force and _up_to_date(_tf_version())
        path = build(force=args.force)
    except BuildError as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 1
    if was_fresh:
        print(f"{path} is up to date (tensorflow {_tf_version()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
