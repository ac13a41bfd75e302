"""Interrupting a conversion (issue #7): SIGINT, SIGTERM or SIGKILL while the export is being
written never leaves a partial DST (and with --overwrite, the previous DST stays whole); SIGINT and
SIGTERM clean up before exiting; the temporary directories a SIGKILLed run leaves (next to DST, and
its private patched copy in the temp folder) are removed by the next run, which succeeds. The source
is never changed.

The source is a model deep enough (hostile_models.deep_module) that writing and re-checking its
export takes seconds; each signal is sent as soon as the run's temporary sibling of DST appears.
All runs go at once: each process costs seconds.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import gbp_rewrite
import hostile_models
import model_zoo
from conftest import cli_command

# run name -> (signal, --overwrite of an existing DST)
RUNS = {
    "SIGINT": (signal.SIGINT, False),
    "SIGTERM": (signal.SIGTERM, False),
    "SIGKILL": (signal.SIGKILL, False),
    "SIGKILL-overwrite": (signal.SIGKILL, True),
}
TIMEOUT = 600
DEPTH = 60  # writing and re-checking the export then takes about 3 s: the window for the signal
PREVIOUS_EXPORT = "previous-export.txt"


def _temporaries(destination: Path) -> list[Path]:
    return sorted(destination.parent.glob(f".{destination.name}.gbp-tmp-*"))


def _patched_copies(pid: int) -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f".gbp_rewrite_patched.gbp-tmp-{pid}-*"))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Start every run, send each its signal while its temporary DST exists, collect the results."""
    root = tmp_path_factory.mktemp("interrupts")
    model = hostile_models.deep_module(root / "deep", depth=DEPTH)
    digest = model_zoo.tree_digest(model)
    runs = {}
    for name, (signum, overwrite) in RUNS.items():
        destination = root / name / "explainable"  # a folder each: a run cleans its own folder
        destination.parent.mkdir()
        if overwrite:
            destination.mkdir()
            (destination / PREVIOUS_EXPORT).write_text("the export a pipeline is serving")
        argv = cli_command("convert", model, destination, *(["--overwrite"] if overwrite else []))
        process = subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs[name] = {"process": process, "destination": destination, "signal": signum, "sent": False}
    deadline = time.monotonic() + TIMEOUT
    while not all(run["sent"] or run["process"].poll() is not None for run in runs.values()):
        assert time.monotonic() < deadline, "no conversion reached the writing stage in time"
        for run in runs.values():
            if not run["sent"] and _temporaries(run["destination"]):
                run["patched_before"] = _patched_copies(run["process"].pid)
                run["process"].send_signal(run["signal"])
                run["sent"] = True
        time.sleep(0.02)
    for run in runs.values():
        run["stdout"], run["stderr"] = run["process"].communicate(timeout=TIMEOUT)
    return model, digest, runs


@pytest.mark.parametrize("name", list(RUNS))
def test_an_interrupted_conversion_leaves_no_partial_destination(interrupted, name):
    _, _, runs = interrupted
    run = runs[name]
    assert run["sent"], f"the run finished before its temporary directory was seen: {run['stderr']}"
    assert run["patched_before"], "the private patched copy was not where expected"
    if RUNS[name][1]:
        assert [p.name for p in run["destination"].iterdir()] == [PREVIOUS_EXPORT], "the old DST was touched"
    else:
        assert not run["destination"].exists()
    if run["signal"] == signal.SIGKILL:
        assert run["process"].returncode == -signal.SIGKILL
        return
    assert run["process"].returncode == 130, run["stderr"]
    lines = [line for line in run["stderr"].splitlines() if line.strip()]
    assert lines == ["gbp-rewrite: interrupted; nothing was left half-written"], run["stderr"]
    assert not _temporaries(run["destination"])
    assert not _patched_copies(run["process"].pid)


def test_the_source_is_unchanged(interrupted):
    model, digest, _ = interrupted
    assert model_zoo.tree_digest(model) == digest


def test_the_next_run_removes_what_a_killed_run_left(interrupted, zoo):
    _, _, runs = interrupted
    for name in ("SIGKILL", "SIGKILL-overwrite"):
        run = runs[name]
        stale = _temporaries(run["destination"])
        assert stale, "SIGKILL runs no cleanup, so its temporary DST should still be there"
        # A small model: any run that writes next to the stale directory removes it.
        report = gbp_rewrite.convert(zoo.model("tf2_module@cnn"), run["destination"], overwrite=True)
        assert report.rewritten and (run["destination"] / "saved_model.pb").is_file()
        assert not any(path.exists() for path in stale)
        # Its patched copy in the temp folder (seen when the signal was sent) is gone too: removed by
        # this run, or already by any other gbp_rewrite run on the machine, as designed.
        assert run["patched_before"] and not any(path.exists() for path in run["patched_before"])
