"""convert(..., version=N|'next'): TF Serving's base_path/N layout, written so that a model server
polling the base path never sees a half-written version."""

from __future__ import annotations

import re
import subprocess

import pytest

import gbp_rewrite
from conftest import cli_command
from gbp_rewrite.errors import OptionError, OutputError, SourceModelError
from gbp_rewrite.report import ConversionReport

MODEL = "keras3@mlp"


def served_versions(base) -> dict[int, str]:
    """What TF Serving's file-system poller takes for versions: children whose names parse as int64
    (strings::safe_strto64: optional surrounding spaces and sign, then digits)."""
    if not base.is_dir():
        return {}
    return {int(p.name): p.name for p in base.iterdir() if re.fullmatch(r"\s*[+-]?\d+\s*", p.name)}


def test_versions_are_numbered_folders(zoo, tmp_path):
    base = tmp_path / "shapes"
    report = gbp_rewrite.convert(zoo.model(MODEL), base, version="next")
    assert served_versions(base) == {1: "1"} and report.destination == str(base / "1")
    gbp_rewrite.convert(zoo.model(MODEL), base, version=7)
    gbp_rewrite.convert(zoo.model(MODEL), base, version="next")
    assert sorted(served_versions(base)) == [1, 7, 8]
    assert all((base / v / "saved_model.pb").is_file() for v in ("1", "7", "8"))
    # no temporary leftovers; the batching suggestion sits beside the versions (gbp_rewrite.serving.batching)
    assert sorted(p.name for p in base.iterdir()) == ["1", "7", "8", "batching_parameters.txt"]
    with pytest.raises(OutputError, match="already exists"):
        gbp_rewrite.convert(zoo.model(MODEL), base, version=7)
    gbp_rewrite.convert(zoo.model(MODEL), base, version=7, overwrite=True)
    for bad in ("latest", -1, "1.5", True):
        with pytest.raises(OptionError, match="next"):
            gbp_rewrite.convert(zoo.model(MODEL), base, version=bad)
    with pytest.raises(OutputError, match="itself a SavedModel"):
        gbp_rewrite.convert(zoo.model(MODEL), base / "1", version="next")
    with pytest.raises(SourceModelError, match="base path with versions 1, 7, 8; verify one version"):
        gbp_rewrite.verify_export(base)


def test_a_polling_server_never_sees_a_partial_version(zoo, tmp_path, monkeypatch):
    base = tmp_path / "shapes"
    gbp_rewrite.convert(zoo.model(MODEL), base, version=1)
    seen = {}
    write_report = ConversionReport.write

    def look_while_writing(self, export_dir):
        # The model is saved and checked, the report is being written: the version is not done.
        seen["versions"] = served_versions(base)
        seen["writing_into"] = export_dir
        write_report(self, export_dir)

    monkeypatch.setattr(ConversionReport, "write", look_while_writing)
    gbp_rewrite.convert(zoo.model(MODEL), base, version="next")
    assert seen["versions"] == {1: "1"}
    assert seen["writing_into"].parent == base and seen["writing_into"].name.startswith(".")
    assert served_versions(base) == {1: "1", 2: "2"}
    assert (base / "2" / "assets" / "gbp_rewrite_report.json").is_file()

    def fail(self, export_dir):
        raise OSError("disk full")

    monkeypatch.setattr(ConversionReport, "write", fail)
    with pytest.raises(OSError, match="disk full"):
        gbp_rewrite.convert(zoo.model(MODEL), base, version="next")
    # nothing half-written left behind
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "batching_parameters.txt"]


def test_serving_version_flag(zoo, tmp_path):
    base = tmp_path / "served"
    procs = [subprocess.Popen(cli_command("convert", zoo.model(MODEL), base, *flag), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for flag in (["--serving_version", "next"], ["--serving_version", "soon"])]
    (code, out, err), (bad_code, _, bad_err) = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert code == 0, err
    assert f"-> {base / '1'}" in out and (base / "1" / "saved_model.pb").is_file()
    assert bad_code == 2 and "--serving_version" in bad_err and "next" in bad_err
