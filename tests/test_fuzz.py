"""Fuzz: hundreds of damaged models through `inspect` and `convert` (issue #7).

Each damaged model (tests/damage.py: truncated or bit-flipped saved_model.pb, structural mutations
that still parse, missing/short/flipped variables, deleted assets, broken .keras files) must end in a
GbpError with a one-line message and nothing left at the destination, or, where the damage is
harmless, in a complete export; never another exception, a hang, an abort or a changed source.

Besides the random cases, damage.TARGETED reproduces on purpose each crash the fuzz found before
it was fixed (regression cases).

The cases run in two worker processes (tests/fuzz_worker.py), in-process there and under a per-case
watchdog, so that a TensorFlow abort or a hang fails this test with the case's seed instead of
killing pytest. A sample is run again through the command line, concurrently.

A failure names the case, its seed and what was damaged. To reproduce it: build the base model
(the zoo's, or hostile_models.vocabulary_module), then damage.damage_savedmodel(base, copy,
random.Random(seed)) and gbp_rewrite.convert(copy, ...). (Saved models are not byte-identical from
one session to the next: function names carry counters, so offsets of truncations and bit flips
land elsewhere; the structural damage and the outcome classes are stable.)
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import damage
import hostile_models
import numpy_reference as ref
from conftest import INPUT_SHAPE, cli_command, source_fingerprint

SEED = 7_2025
SAVEDMODEL_CASES = 240
KERAS_CASES = 40
WORKERS = 2
CASE_TIMEOUT = 120  # seconds; a case takes well under 2 s even on a loaded machine
WORKER = Path(__file__).with_name("fuzz_worker.py")
SAVEDMODEL_FAMILIES = ("keras3@cnn", "tf_keras@cnn", "tf1@cnn", "tf2_module@cnn", "vocabulary")


@pytest.fixture(scope="module")
def bases(zoo, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz_bases")
    found = {name: zoo.model(name) for name in SAVEDMODEL_FAMILIES if "@" in name}
    found["vocabulary"] = hostile_models.vocabulary_module(root / "vocabulary")
    assert (found["vocabulary"] / "assets" / "vocabulary.txt").is_file(), "the asset model has no asset"
    ref.keras_model(zoo.spec("cnn"), INPUT_SHAPE).save(str(root / "model.keras"))
    found["keras"] = root / "model.keras"
    return found


def _cases(bases: dict[str, Path]) -> list[dict]:
    rng = random.Random(SEED)
    cases = []
    for index in range(SAVEDMODEL_CASES + KERAS_CASES):
        family = rng.choice(SAVEDMODEL_FAMILIES) if index < SAVEDMODEL_CASES else "keras"
        cases.append({"id": index, "family": family, "base": str(bases[family]), "seed": SEED * 1000 + index,
                      "format": "keras" if family == "keras" else "savedmodel"})
    for name, (family, _, _) in damage.TARGETED.items():
        cases.append({"id": len(cases), "family": family, "base": str(bases[family]), "seed": 0,
                      "format": "targeted", "name": name})
    return cases


@pytest.fixture(scope="module")
def fuzz(bases, tmp_path_factory):
    """{case id: facts}, the cases, and each worker's (exit status, stderr tail, case it died in)."""
    work = tmp_path_factory.mktemp("fuzz")
    cases = _cases(bases)
    workers = []
    for number in range(WORKERS):
        jobs = work / f"jobs-{number}.json"
        jobs.write_text(json.dumps({"work": str(work / f"w{number}"), "timeout": CASE_TIMEOUT,
                                    "cases": cases[number::WORKERS]}))
        results, stderr = work / f"results-{number}.jsonl", open(work / f"stderr-{number}.txt", "w")
        process = subprocess.Popen([sys.executable, str(WORKER), str(jobs), str(results)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        workers.append((process, results, stderr))
    facts, deaths = {}, []
    for process, results, stderr in workers:
        try:
            status = process.wait(timeout=CASE_TIMEOUT * 10)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
        stderr.close()
        unfinished = None
        for line in results.read_text().splitlines() if results.exists() else []:
            record = json.loads(line)
            if record.get("started"):
                unfinished = record["id"]
            else:
                facts[record["id"]] = record
                unfinished = None
        if status != 0:
            deaths.append((status, unfinished, Path(stderr.name).read_text()[-4000:]))
    return facts, cases, deaths


def test_no_worker_was_aborted_or_hung(fuzz):
    facts, cases, deaths = fuzz
    messages = []
    for status, case_id, stderr in deaths:
        case = cases[case_id] if case_id is not None else None
        messages.append(f"worker exit {status} during case {case} (seed {case and case['seed']}):\n{stderr}")
    assert not deaths, "\n\n".join(messages)
    assert len(facts) == len(cases)


def _violations(facts: dict) -> list[str]:
    """What is wrong with one case's outcome; empty when it failed cleanly or converted."""
    wrong = []
    for call in ("inspect", "convert"):
        result = facts[call]
        if result["status"] == "crash":
            wrong.append(f"{call} raised {result['type']}: {result['message']}\n{result['traceback']}")
        elif result["status"] == "GbpError" and result["lines"] != 1:
            wrong.append(f"{call}'s error has {result['lines']} lines: {result['message']!r}")
    if facts["source_changed"]:
        wrong.append("the source changed")
    converted = facts["convert"]["status"] == "ok"
    if converted and not facts["export_complete"]:
        wrong.append("convert succeeded but the export is incomplete")
    if not converted and facts["destination_exists"]:
        wrong.append("convert failed but left the destination")
    if facts["leftovers"]:
        wrong.append(f"temporary directories left next to the destination: {facts['leftovers']}")
    return wrong


def test_every_damaged_model_fails_cleanly_or_converts(fuzz):
    facts, cases, _ = fuzz
    report = []
    for case_id, case_facts in sorted(facts.items()):
        for problem in _violations(case_facts):
            report.append(f"case {case_id} ({case_facts['family']}, seed {cases[case_id]['seed']}: "
                          f"{case_facts['note']}): {problem}")
    assert not report, f"{len(report)} problem(s):\n" + "\n".join(report)


def test_the_fuzz_reaches_every_kind_of_damage_and_both_outcomes(fuzz):
    """Guards the fuzz itself: every damage kind occurs, and both clean failures and harmless
    damage that still converts are seen (a fuzz whose cases all fail at parsing proves little)."""
    facts, _, _ = fuzz
    statuses = collections.Counter((f["family"] == "keras", f["convert"]["status"]) for f in facts.values())
    assert statuses[(False, "GbpError")] >= 50 and statuses[(False, "ok")] >= 10, statuses
    assert statuses[(True, "GbpError")] >= 10, statuses
    kinds = {_kind(f) for f in facts.values()}
    expected = set(damage.SAVEDMODEL_DAMAGE) | {f"keras_{kind}" for kind in damage.KERAS_DAMAGE} | {"targeted"}
    assert kinds == expected, f"kinds never drawn: {sorted(expected - kinds)}"
    notes = " ".join(f["note"] for f in facts.values())
    for phrase in ("variables.index", "variables.data", "asset vocabulary.txt deleted"):
        assert phrase in notes, f"no case with {phrase!r}"
    messages = " ".join(f["convert"].get("message", "") for f in facts.values())
    for phrase in ("corrupt or truncated", "variables", "damaged"):
        assert phrase in messages, f"no failure saying {phrase!r}"


def test_every_crash_the_fuzz_found_is_a_clean_error_now(fuzz):
    """Regression cases (damage.TARGETED): each reproduces one crash the fuzz found before it was
    fixed (an AttributeError, MemoryError, TypeError, ValueError, KeyError, DecodeError, and a
    TensorFlow abort); each must now be a GbpError whose one line says what is wrong."""
    facts, cases, _ = fuzz
    for case in cases:
        if case["format"] == "targeted":
            result = facts[case["id"]]["convert"]
            phrase = damage.TARGETED[case["name"]][2]
            assert result["status"] == "GbpError", (case["name"], result)
            assert phrase in result["message"], (case["name"], result["message"])


def _kind(case_facts: dict) -> str:
    return case_facts["note"].split(":")[0]


# (kind of damage, API outcome) run again through the command line: each process costs seconds.
# (test_cli_errors.py already runs a truncated saved_model.pb and short variables through the CLI.)
CLI_SAMPLE = (("mutate_pb", "GbpError"), ("asset", "GbpError"), ("keras_config", "GbpError"), ("mutate_pb", "ok"))


def _cli_sample(facts: dict) -> list[int]:
    """The first case of each (kind, outcome) in CLI_SAMPLE."""
    chosen: dict[tuple[str, str], int] = {}
    for case_id, case_facts in sorted(facts.items()):
        key = (_kind(case_facts), case_facts["convert"]["status"])
        if key in CLI_SAMPLE and key not in chosen:
            chosen[key] = case_id
    assert set(chosen) == set(CLI_SAMPLE), f"the fuzz drew no case for {set(CLI_SAMPLE) - set(chosen)}"
    return sorted(chosen.values())


def _one_line_error(err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("gbp-rewrite: error: ")


def test_damaged_models_through_the_command_line(fuzz, tmp_path):
    """The CLI agrees with the API on a sample: exit 1 and one line for a failure, 0 for a model
    that converts; no traceback, nothing left behind. Run concurrently: each process costs seconds."""
    facts, cases, _ = fuzz
    sample = _cli_sample(facts)
    processes = {}
    for case_id in sample:
        case = cases[case_id]
        rng = random.Random(case["seed"])
        folder = tmp_path / f"case-{case_id}"
        folder.mkdir()
        if case["format"] == "keras":
            source = folder / "model.keras"
            damage.damage_keras_file(Path(case["base"]), source, rng)
        else:
            source = folder / "model"
            damage.damage_savedmodel(Path(case["base"]), source, rng)
        destination = folder / "out"
        processes[case_id] = (_popen("convert", source, destination), destination, source, source_fingerprint(source))
    first_failure = next(i for i in sample if facts[i]["convert"]["status"] == "GbpError")
    inspected = _popen("inspect", next((tmp_path / f"case-{first_failure}").glob("model*")))
    for case_id, (process, destination, source, fingerprint) in processes.items():
        out, err = process.communicate(timeout=600)
        context = f"case {case_id} ({facts[case_id]['note']}): exit {process.returncode}, stderr {err!r}"
        assert "Traceback" not in err, context
        if facts[case_id]["convert"]["status"] == "GbpError":
            assert process.returncode == 1 and _one_line_error(err), context
            assert not destination.exists(), context
        else:
            assert process.returncode == 0, context
            assert (destination / "saved_model.pb").is_file(), context
        assert not list(destination.parent.glob(".out.gbp-*")), f"temporary directory left: {context}"
        assert source_fingerprint(source) == fingerprint, f"the source changed: {context}"
    out, err = inspected.communicate(timeout=600)
    assert "Traceback" not in err
    expected = 1 if facts[first_failure]["inspect"]["status"] == "GbpError" else 0
    assert inspected.returncode == expected, err
    if inspected.returncode == 1:
        assert _one_line_error(err), err


def _popen(*args) -> subprocess.Popen:
    """The CLI as a user runs it: without conftest's TF_CPP_MIN_LOG_LEVEL=2, which would let
    TensorFlow's C++ error log lines about a damaged graph through (the CLI's own default hides them)."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.Popen(cli_command(*args), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
