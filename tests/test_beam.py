"""The Beam pipeline (gbp_rewrite.beam, `explain --runner`) against single-process `explain`.

The reference is `explain` itself, run on the same files: its pictures, results.csv rows,
summary.json records and saliency arrays. The pipeline runs on DirectRunner, in-process, except
for one command-line run with two worker processes (apache-beam comes with the test extra).
Image set: the shipped testdata images, a truncated PNG, a grey-scale PNG and a few dozen
generated pictures (PNG and JPEG; RGB and RGBA; sizes around the model's), all made with fixed
seeds.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from conftest import REPO, cli_command

from gbp_rewrite.beam import ExplainImages, run_explain
from gbp_rewrite.errors import ImageError, OptionError, SourceModelError
from gbp_rewrite.pictures import explainer

sys.path.insert(0, str(REPO / "tools"))
import shapes

TESTDATA_IMAGES = sorted((REPO / "testdata" / "images").glob("*.png"))
GENERATED = 30
PICTURE_KINDS = ("figure", "heatmap", "overlay", "guided")  # results.PICTURES, spelled out


@pytest.fixture(scope="module")
def model_dir(zoo) -> str:
    """The shipped model converted (the same conversion test_explain uses, made once per session)."""
    return str(zoo.converted("shapes_cnn", saliency_map=True)[0])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """testdata images + a truncated PNG + a grey-scale PNG + generated pictures of the shapes."""
    folder = tmp_path_factory.mktemp("beam_images")
    for path in TESTDATA_IMAGES:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "corrupt.png").write_bytes(TESTDATA_IMAGES[0].read_bytes()[:300])
    rng = np.random.default_rng(17)
    grey = rng.integers(0, 256, (30, 26, 1), dtype=np.uint8)
    (folder / "grey.png").write_bytes(tf.io.encode_png(grey).numpy())
    pictures, _, _ = shapes.make_dataset(GENERATED, seed=5)
    for n, picture in enumerate(pictures):
        size = (int(rng.integers(24, 49)), int(rng.integers(24, 49)))
        resized = tf.image.resize(picture, size, method="nearest").numpy().astype(np.uint8)
        kind = ("png", "jpg", "rgba")[n % 3]
        if kind == "jpg":
            data = tf.io.encode_jpeg(resized, quality=90).numpy()
        elif kind == "rgba":
            alpha = rng.integers(0, 256, (*size, 1), dtype=np.uint8)
            data = tf.io.encode_png(np.concatenate([resized, alpha], axis=-1)).numpy()
        else:
            data = tf.io.encode_png(resized).numpy()
        (folder / f"generated_{n:03d}.{'jpg' if kind == 'jpg' else 'png'}").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def single_process(model_dir, image_dir, tmp_path_factory):
    """`explain` on the folder, one image per model call: (out dir, results.csv rows by file,
    summary.json records by file, saliency by file)."""
    out = tmp_path_factory.mktemp("explain_out")
    summary = explainer.explain(model_dir, image_dir, out_dir=out, batch_size=1)
    assert summary.explained == len(list(image_dir.iterdir())) - 2 and len(summary.failed) == 2
    loaded = explainer.load_model(model_dir)
    paths = sorted(str(p) for p in image_dir.iterdir())
    saliency = {item.file: item.saliency
                for batch in explainer.explain_batches(loaded, paths, batch_size=1)
                for item in batch if isinstance(item, explainer.Explained)}
    records = {r["file"]: r for r in json.loads((out / "summary.json").read_text())["images"]}
    return out, _csv_rows([out / "results.csv"]), records, saliency


def _csv_rows(files) -> dict[str, dict]:
    rows = {}
    for file in files:
        with open(file, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                assert row["file"] not in rows, f"{row['file']} twice in the results"
                rows[row["file"]] = row
    return rows


def _jsonl_records(out: Path) -> dict[str, dict]:
    lines = [line for f in sorted(out.glob("results-*.jsonl")) for line in f.read_text().splitlines()]
    return {record["file"]: record for record in map(json.loads, lines)}


def _pictures(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _run_in_process(pipeline_input, out: Path, *, returned=None, **options):
    """ExplainImages on DirectRunner in this process: (results-*.jsonl records by file, metrics
    explained, failed). `returned`: the records by file the transform's output must equal."""
    from apache_beam.testing.util import assert_that

    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"]))
    records = pipeline | beam.Create(pipeline_input) | ExplainImages(out=str(out), **options)
    if returned is not None:
        assert_that(records, lambda got: _same_records(got, returned))
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace("gbp_rewrite"))["counters"]
    counts = {c.key.metric.name: c.committed for c in counters}
    return _jsonl_records(out), counts.get("explained", 0), counts.get("failed", 0)


def _same_records(got, want) -> None:
    got = {record["file"]: record for record in got}
    if got != want:
        raise AssertionError(f"the returned records differ from explain's: {sorted(set(got) ^ set(want))}")


@pytest.fixture(scope="module")
def pipelined(model_dir, image_dir, single_process, tmp_path_factory):
    """The pipeline on the folder's glob, one image per model call, with the saliency arrays; its
    output PCollection must equal explain's summary.json records."""
    out = tmp_path_factory.mktemp("beam_out")
    records, explained, failed = _run_in_process(
        [str(image_dir / "*")], out, returned=single_process[2], model_dir=model_dir, batch_size=1,
        saliency_format="parquet")
    return out, records, explained, failed


# ---------------------------------------------------------------- equality with explain


def test_pictures_equal_explains_bit_for_bit(single_process, pipelined):
    want, got = _pictures(single_process[0]), _pictures(pipelined[0])
    assert len(want) == len(PICTURE_KINDS) * (len(TESTDATA_IMAGES) + GENERATED)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []


def test_results_equal_explains_rows_and_records(single_process, pipelined):
    """results-*.csv rows = results.csv rows, results-*.jsonl records = summary.json's (and the
    transform's output, checked in the fixture); corrupt and grey-scale files are failed rows with
    explain's reason."""
    _, want_rows, want_records, _ = single_process
    out, records, _, _ = pipelined
    assert _csv_rows(sorted(out.glob("results-*.csv"))) == want_rows
    assert records == want_records
    failed = {Path(f).name: r["reason"] for f, r in want_records.items() if r["status"] == "failed"}
    assert set(failed) == {"corrupt.png", "grey.png"}
    assert failed["corrupt.png"].startswith("corrupt or truncated image")
    assert failed["grey.png"].startswith("grey-scale (1 channel)")


def test_metrics_count_explained_and_failed(single_process, pipelined):
    _, _, records, _ = single_process
    statuses = [r["status"] for r in records.values()]
    assert pipelined[2:] == (statuses.count("explained"), statuses.count("failed")) == (len(statuses) - 2, 2)


def test_saliency_arrays_equal_explains(single_process, pipelined):
    """saliency-*.parquet: per explained file its class, score and the saliency array, bit for bit."""
    import pyarrow.parquet as pq

    _, _, records, saliency = single_process
    rows = [row for f in sorted(pipelined[0].glob("saliency-*.parquet")) for row in pq.read_table(f).to_pylist()]
    assert sorted(r["file"] for r in rows) == sorted(saliency)
    for row in rows:
        array = np.asarray(row["saliency"], np.float32).reshape(row["shape"])
        assert array.dtype == saliency[row["file"]].dtype
        np.testing.assert_array_equal(array, saliency[row["file"]])
        assert (row["class"], row["score"]) == (records[row["file"]]["class"], records[row["file"]]["score"])


def test_output_names_are_explains_across_folders(model_dir, tmp_path):
    """Files of equal stems in several folders (and one named like a suffixed name) get the
    picture names explain gives them, here from (file, bytes) pairs."""
    data = TESTDATA_IMAGES[0].read_bytes()
    files = []
    for folder, name in (("a", "x.png"), ("b", "x.png"), ("c", "x.jpg"), ("d", "x_2.png"), ("e", "y.png")):
        (tmp_path / "in" / folder).mkdir(parents=True)
        files.append(tmp_path / "in" / folder / name)
        files[-1].write_bytes(data)
    want = explainer.explain(model_dir, [str(f) for f in files], out_dir=tmp_path / "explain", batch_size=1)
    assert not want.failed
    want_rows = _csv_rows([tmp_path / "explain" / "results.csv"])
    records, _, _ = _run_in_process([(str(f), f.read_bytes()) for f in reversed(files)], tmp_path / "beam",
                                    model_dir=model_dir, batch_size=1)
    assert {f: r["outputs"] for f, r in records.items()} == {
        f: {kind: want_rows[f][kind] for kind in PICTURE_KINDS} for f in want_rows}
    assert {r["outputs"]["heatmap"] for r in records.values()} == {
        "x_heatmap.png", "x_3_heatmap.png", "x_4_heatmap.png", "x_2_heatmap.png", "y_heatmap.png"}
    assert _pictures(tmp_path / "beam") == _pictures(tmp_path / "explain")


def test_large_model_shares_one_model_and_gives_the_same_rows(model_dir, tmp_path):
    """large_model=True: RunInference calls the model through a proxy to another process; the
    rows and pictures are still explain's."""
    files = [str(p) for p in TESTDATA_IMAGES[:4]]
    explainer.explain(model_dir, files, out_dir=tmp_path / "explain", batch_size=1)
    records, explained, failed = _run_in_process(files, tmp_path / "beam", model_dir=model_dir, batch_size=1,
                                                 large_model=True)
    assert (explained, failed) == (4, 0)
    assert _csv_rows(sorted((tmp_path / "beam").glob("results-*.csv"))) == _csv_rows([tmp_path / "explain" / "results.csv"])
    assert _pictures(tmp_path / "beam") == _pictures(tmp_path / "explain")


# ---------------------------------------------------------------- batches


def _saliency_of_copies(model_dir, out: Path, *, batch_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """One image given 7 times among 13 others (so in different batches and positions): the
    saliency of each copy, and of the image alone in a direct model call."""
    import pyarrow.parquet as pq

    files = [p for p in (REPO / "testdata" / "images").glob("*.png")]
    probe = files[0].read_bytes()
    pictures, _, _ = shapes.make_dataset(13, seed=11)
    pairs = [(f"copy_{n}.png", probe) for n in range(7)]
    pairs += [(f"mate_{n}.png", tf.io.encode_png(p).numpy()) for n, p in enumerate(pictures)]
    order = np.random.default_rng(3).permutation(len(pairs))
    _run_in_process([pairs[i] for i in order], out, model_dir=model_dir, batch_size=batch_size,
                    saliency_format="parquet")
    rows = [r for f in sorted(out.glob("saliency-*.parquet")) for r in pq.read_table(f).to_pylist()]
    copies = [np.asarray(r["saliency"], np.float32).reshape(r["shape"]) for r in rows if r["file"].startswith("copy_")]
    assert len(copies) == 7
    pixels = tf.io.decode_png(probe).numpy()[None].astype(np.float32) / 255.0  # the model's input size
    alone = tf.saved_model.load(model_dir).signatures["serving_default"](image=tf.constant(pixels))
    return copies, alone["saliency"].numpy()[0]


def test_one_image_per_call_is_independent_of_batch_mates(model_dir, tmp_path):
    copies, alone = _saliency_of_copies(model_dir, tmp_path, batch_size=1)
    for copy in copies:
        np.testing.assert_array_equal(copy, alone)


def test_batched_saliency_agrees_to_float32_rounding(model_dir, tmp_path):
    """In batches of 4, the copies meet different mates at different rows. TensorFlow's CPU
    kernels (MatMul, Conv2D) round by batch size and row, so equality is to float32 rounding."""
    copies, alone = _saliency_of_copies(model_dir, tmp_path, batch_size=4)
    scale = np.abs(alone).max()
    assert scale > 0
    for copy in copies:
        assert np.abs(copy - alone).max() <= 1e-5 * scale


def test_direct_runner_never_hands_the_pipeline_to_prism(model_dir, tmp_path, monkeypatch):
    """Beam's DirectRunner would try its Prism runner first (downloaded from GitHub; workers as
    threads of this process, --direct_num_workers ignored); run_explain must go to the FnApiRunner.
    Offline the download fails and Beam falls back anyway, so the attempt itself is what is
    checked."""
    from apache_beam.runners.portability import prism_runner

    attempts = []

    def refuse(self, *args, **kwargs):
        attempts.append(self)
        raise RuntimeError("Prism must not be tried")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", refuse)
    summary = run_explain(model_dir, [str(TESTDATA_IMAGES[0])], out=str(tmp_path / "out"), runner="DirectRunner")
    assert attempts == [] and summary.explained == 1 and summary.failed == 0


# ---------------------------------------------------------------- errors


def test_bad_options_are_one_line_errors(model_dir, tmp_path):
    with pytest.raises(OptionError, match="unknown saliency format 'npy'; valid formats: parquet"):
        ExplainImages(model_dir, out=str(tmp_path), saliency_format="npy")
    with pytest.raises(OptionError, match="batch_size must be at least 1; got 0"):
        ExplainImages(model_dir, out=str(tmp_path), batch_size=0)
    with pytest.raises(ImageError, match=r"no files match '.*nothing-\*\.png'"):
        run_explain(model_dir, [str(tmp_path / "nothing-*.png")], out=str(tmp_path / "out"))
    with pytest.raises(OptionError, match="--class 9 is out of range.*4 classes"):
        run_explain(model_dir, [str(TESTDATA_IMAGES[0])], out=str(tmp_path / "out"), class_index=9)
    with pytest.raises(SourceModelError, match="not an explainable export"):
        run_explain(str(REPO / "testdata" / "shapes_cnn"), [str(TESTDATA_IMAGES[0])], out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the command line


def _worker_processes(parent: int) -> set[int]:
    """Beam SDK worker processes below `parent` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"sdk_worker_main" in cmdline and _descends(int(stat[1]), parent):
            found.add(int(entry.name))
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts worker processes through /proc")
def test_cli_runner_two_worker_processes(model_dir, image_dir, single_process, tmp_path):
    """explain --runner DirectRunner -- --direct_num_workers 2 --direct_running_mode
    multi_processing: two worker processes, explain's pictures and rows, the metrics printed,
    exit status 1 (two images failed) with a one-line reason."""
    out = tmp_path / "out"
    argv = cli_command("explain", model_dir, "--glob", str(image_dir / "*"), "--out", out, "--runner",
                       "DirectRunner", "--batch_size", "1", "--", "--direct_num_workers", "2",
                       "--direct_running_mode", "multi_processing")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    watcher = threading.Thread(target=lambda: _watch(process, workers), daemon=True)
    watcher.start()
    stdout, stderr = process.communicate(timeout=600)
    watcher.join()
    assert process.returncode == 1, stderr
    assert len(workers) >= 2, f"worker processes seen: {workers}"
    explained = len(TESTDATA_IMAGES) + GENERATED
    assert f"metrics: explained {explained}, failed 2" in stdout
    assert stderr.strip().splitlines()[-1] == (
        f"gbp-rewrite: error: 2 of {explained + 2} image(s) could not be explained (listed with their "
        f"reason in {out}/results-*.csv)")
    assert _csv_rows(sorted(out.glob("results-*.csv"))) == single_process[1]
    assert _pictures(out) == _pictures(single_process[0])


def _watch(process: subprocess.Popen, workers: set[int]) -> None:
    while process.poll() is None:
        workers.update(_worker_processes(process.pid))
        time.sleep(0.2)


def test_cli_usage_errors(model_dir, tmp_path):
    cases = {
        ("--glob", "x*.png", "--out", str(tmp_path)): "add --runner NAME",
        ("--runner", "DirectRunner", "--dir", str(tmp_path), "--out", str(tmp_path)): "given with --glob",
        ("--runner", "DirectRunner", "--out", str(tmp_path)): "needs --glob",
    }
    for args, message in cases.items():
        result = subprocess.run(cli_command("explain", model_dir, *args), capture_output=True, text=True, check=False)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    result = subprocess.run(cli_command("inspect", model_dir, "--", "--direct_num_workers", "2"),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "'inspect' takes no arguments after --" in result.stderr


# ---------------------------------------------------------------- without apache-beam

_BLOCK_BEAM = textwrap.dedent("""
    import importlib.abc, sys

    class BlockBeam(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "apache_beam" or name.startswith("apache_beam."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockBeam())
""")


def test_without_beam_everything_else_works(model_dir, tmp_path):
    """With apache_beam unimportable: gbp_rewrite and `explain` (no runner) work and never import
    it; `explain --runner` and `import gbp_rewrite.beam` are one-line errors naming the extra."""
    script = _BLOCK_BEAM + textwrap.dedent(f"""
        import gbp_rewrite
        summary = gbp_rewrite.explain({model_dir!r}, [{str(TESTDATA_IMAGES[0])!r}], out_dir={str(tmp_path / "a")!r})
        assert summary.explained == 1
        try:
            import gbp_rewrite.beam
        except gbp_rewrite.GbpError as e:
            print("ERROR", e)
        from gbp_rewrite.cli import main, parse_command_line
        args = parse_command_line(["gbp-rewrite", "explain", {model_dir!r}, "--runner", "DirectRunner", "--glob",
                                   "x", "--out", {str(tmp_path / "b")!r}])
        print("STATUS", main(args))
        print("BEAM LOADED", any(m.startswith("apache_beam") for m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert result.returncode == 0, result.stderr
    extra = "install the beam extra: pip install -e '.[beam]'"
    assert f"ERROR running explain as a Beam pipeline needs apache-beam, which is not installed; {extra}" in result.stdout
    assert "STATUS 1" in result.stdout and "BEAM LOADED False" in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("gbp-rewrite:")]
    assert lines == [(f"gbp-rewrite: error: running explain as a Beam pipeline needs apache-beam, which is not "
                      f"installed; {extra}")]
