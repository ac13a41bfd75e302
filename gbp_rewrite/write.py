"""Atomic output: write into a temporary sibling of the destination, rename it into place at the end.

A reader (a TF Serving model server polling its base path, a person, a pipeline) sees either no
destination or a complete one, never half a model; a failure or an interrupt leaves nothing behind.
Temporary siblings of runs that were killed are removed by the next run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from gbp_rewrite.errors import OptionError, OutputError

log = logging.getLogger(__name__)

_TMP_MARK = ".gbp-tmp-"
_OLD_MARK = ".gbp-old-"
_STALE = re.compile(r"^\.(?P<name>.+)\.gbp-(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def check_destination(destination: Path, *, source: Path | None, overwrite: bool) -> None:
    """Refuse destinations that would lose data: existing ones (unless overwrite), or the source."""
    if source is not None:
        src, dst = source.resolve(), destination.resolve()
        if dst == src or src in dst.parents:
            raise OutputError(
                f"the destination '{destination}' is {'the source itself' if dst == src else 'inside the source'} "
                f"'{source}'; choose a directory outside the source model"
            )
        if dst in src.parents:
            raise OutputError(
                f"the destination '{destination}' contains the source '{source}'; overwriting it "
                "would delete the source; choose another directory"
            )
    if destination.exists() or destination.is_symlink():
        if not overwrite:
            raise OutputError(
                f"the destination '{destination}' already exists; it was left untouched (pass "
                "--overwrite to replace it, or choose another directory)"
            )
        if not destination.is_dir():
            raise OutputError(f"the destination '{destination}' exists and is not a directory")


@contextlib.contextmanager
def atomic_directory(destination: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `destination` when the block ends without error."""
    destination = Path(destination)
    parent = destination.parent
    created = _make_parents(parent)
    remove_stale_siblings(parent)
    tmp = parent / f".{destination.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        yield tmp
        _move_into_place(tmp, destination, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    for directory in [parent, *parent.parents]:
        if directory.exists():
            break
        missing.append(directory)
    missing.reverse()
    try:
        for directory in missing:
            directory.mkdir()
    except OSError as e:
        raise OutputError(f"cannot create the destination's folder '{parent}': {e.strerror}") from None
    return missing


def _move_into_place(tmp: Path, destination: Path, *, overwrite: bool) -> None:
    if destination.exists() or destination.is_symlink():
        if not overwrite:  # appeared while we were converting
            raise OutputError(f"the destination '{destination}' appeared during the conversion; left untouched")
        old = destination.parent / f".{destination.name}{_OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(destination, old)
        os.replace(tmp, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, destination)


def remove_stale_siblings(parent: Path) -> list[Path]:
    """Delete temporary directories left in `parent` by gbp_rewrite runs that no longer exist."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if match and not _process_alive(int(match.group("pid"))):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed '%s', left by an interrupted run", entry)
            removed.append(entry)
    return removed


def temporary_directory(name: str) -> Path:
    """A new private directory in the system's temp folder, named like a temporary sibling so that
    the next run removes it if this process is killed before it can (SIGKILL runs no cleanup)."""
    parent = Path(tempfile.gettempdir())
    remove_stale_siblings(parent)
    path = parent / f".{name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    return path


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def next_version(base: Path) -> int:
    """The next free TF Serving version number under `base` (1 when there is none)."""
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


NEXT_VERSION = "next"


def served_version(path: Path) -> Path | None:
    """The highest version folder TF Serving would serve when `path` is a model base path.

    None when `path` is itself a SavedModel or holds no numbered SavedModel folder. A base path
    holds only version folders (`path`/1, `path`/2, ...); the server serves the highest.
    """
    path = Path(path)
    if not path.is_dir() or (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
        return None
    versions = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()
                and ((p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file())]
    return max(versions, key=lambda p: int(p.name), default=None)


def resolve_served_version(path: str | os.PathLike, *, command: str) -> Path:
    """`path`, or its highest version when it is a TF Serving base path (a warning says which)."""
    version = served_version(Path(path))
    if version is None:
        return Path(path)
    log.warning("'%s' is a TF Serving base path; %s uses its highest version, '%s'", path, command, version)
    return version


def version_directory(base: Path, version: int | str | None) -> Path:
    """Where a TF Serving model version goes: `base`/N (N given, or 'next' = the next free number).

    `version` None means no version layout: `base` itself. TF Serving watches a model's base path
    and serves the subfolders whose names are numbers; `atomic_directory` writes into a sibling
    whose name starts with '.', which the server never takes for a version, and renames it to N
    only when complete, so a running server never loads a half-written version.
    """
    if version is None:
        return base
    number = _version_number(version)
    if base.exists() and not base.is_dir():
        raise OutputError(f"the model base path '{base}' exists and is not a directory")
    if (base / "saved_model.pb").exists():
        raise OutputError(
            f"'{base}' is itself a SavedModel, not a model base path; with a version, DST is the "
            "folder that holds the version folders (DST/1, DST/2, ...): choose another folder"
        )
    return base / str(next_version(base) if number is None else number)


def _version_number(version: int | str) -> int | None:
    """A version number, or None for 'next'; anything else is an OptionError."""
    if isinstance(version, str) and version.strip() == NEXT_VERSION:
        return None
    text = str(version).strip() if not isinstance(version, bool) else ""
    if not text.isdigit():
        raise OptionError(
            f"invalid serving version {version!r}; give a non-negative integer (the TF Serving "
            f"version folder) or '{NEXT_VERSION}' (one more than the highest existing version)"
        )
    return int(text)
