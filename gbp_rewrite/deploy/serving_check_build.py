"""Build the C++ serving check (gbp_rewrite/cpp/serving_check.cc) into a user cache folder.

The source ships inside the package (package data), so an installed gbp_rewrite, editable or not,
can build it: g++ with the flags of the installed tensorflow wheel (`tf.sysconfig`), linked against
its `libtensorflow_cc.so.2`. The binary goes to

    $GBP_REWRITE_CACHE_DIR, else $XDG_CACHE_HOME/gbp_rewrite, else ~/.cache/gbp_rewrite
        / serving_check-tf<version>-<source hash>/serving_check

so a new TensorFlow or a changed source gets its own build and an old one is never taken for it.
The link writes a temporary name in that folder and renames it into place: an interrupted build
leaves no binary, and concurrent builds each finish with a whole one. A build takes about a
minute and a gigabyte of memory, once per TensorFlow version; one warning line says where it goes
and how long it takes.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from gbp_rewrite.errors import GbpError

log = logging.getLogger(__name__)

CACHE_ENV = "GBP_REWRITE_CACHE_DIR"
BINARY_NAME = "serving_check"
SOURCE_RESOURCE = ("cpp", "serving_check.cc")  # inside the gbp_rewrite package

_EXTRA_CXXFLAGS = [
    "-O2",
    # The TF headers trigger hundreds of these with g++ 12.
    "-Wno-deprecated-declarations",
    "-Wno-interference-size",
]


class BuildError(GbpError):
    """The compiler is missing or the compilation failed (one line: why, and what to do)."""


def source_path() -> Path:
    """serving_check.cc as installed with the package (importlib.resources: package data)."""
    resource = importlib.resources.files("gbp_rewrite").joinpath(*SOURCE_RESOURCE)
    path = Path(str(resource))
    if not path.is_file():
        raise BuildError(f"the C++ source {path} is missing from the installed gbp_rewrite; reinstall it")
    return path


def cache_dir() -> Path:
    """$GBP_REWRITE_CACHE_DIR, else $XDG_CACHE_HOME/gbp_rewrite, else ~/.cache/gbp_rewrite."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gbp_rewrite"


def binary_path() -> Path:
    """Where the binary for this TensorFlow and this source lives (built or not)."""
    digest = hashlib.sha256(source_path().read_bytes()).hexdigest()[:12]
    return cache_dir() / f"{BINARY_NAME}-tf{_tf_version()}-{digest}" / BINARY_NAME


def built_binary() -> Path | None:
    """The binary when it is built, else None (never builds)."""
    path = binary_path()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def compiler() -> str | None:
    """The C++ compiler ($CXX, default g++) on PATH, or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def build(*, force: bool = False) -> Path:
    """The binary, compiled first when it is not in the cache (or `force`); raises BuildError."""
    binary = binary_path()
    if not force and built_binary() is not None:
        return binary
    cxx = compiler()
    if cxx is None:
        raise BuildError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH to build the serving "
                         "check; install g++ (e.g. apt-get install g++) or set CXX")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.parent / f".{BINARY_NAME}.{os.getpid()}.tmp"  # same folder: os.replace is atomic
    log.warning("building the C++ serving check into %s (g++, about a minute, once per TensorFlow version)",
                binary.parent)
    started = time.monotonic()
    try:
        proc = _run_compiler(_command(cxx, partial), cxx)
        if proc.returncode == 0:
            os.replace(partial, binary)
    finally:
        partial.unlink(missing_ok=True)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error:" in line or "undefined reference" in line]
        detail = (errors or proc.stderr.strip().splitlines() or ["(no output)"])[0]
        raise BuildError(f"compiling the C++ serving check failed (exit {proc.returncode}) after "
                         f"{elapsed:.0f} s: {detail}")
    log.info("built %s in %.0f s", binary, elapsed)
    return binary


def _tf_version() -> str:
    import tensorflow as tf  # imported here (and in _command): finding a built binary needs no TensorFlow

    return tf.__version__


def _command(cxx: str, output: Path) -> list[str]:
    import tensorflow as tf

    compile_flags = list(tf.sysconfig.get_compile_flags())
    if not any(f.lstrip("-").startswith("std=") for f in compile_flags):
        compile_flags.append("-std=c++17")
    lib_dir = Path(tf.sysconfig.get_lib())
    # The wheel ships libtensorflow_cc.so.2, usually without an unversioned symlink.
    cc_libs = sorted(lib_dir.glob("libtensorflow_cc.so*"))
    if not cc_libs:
        raise BuildError(f"libtensorflow_cc.so* not found in {lib_dir}: this tensorflow wheel cannot "
                         "build the serving check")
    cc_lib = min(cc_libs, key=lambda p: (p.name != "libtensorflow_cc.so.2", p.name))
    return [
        cxx, *compile_flags, *_EXTRA_CXXFLAGS, str(source_path()), "-o", str(output),
        # Without --no-as-needed the linker drops libtensorflow_cc (nothing references its symbols
        # directly), so the DirectSession factory is never registered: "No session factory registered".
        "-Wl,--no-as-needed", *tf.sysconfig.get_link_flags(), f"-l:{cc_lib.name}", f"-Wl,-rpath,{lib_dir}",
    ]


def _run_compiler(command: list[str], cxx: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise BuildError(f"cannot run {cxx}: {e}") from None
