"""The part of `verify` that runs in a clean process: plain TensorFlow and numpy, no gbp_rewrite.

This file must never import gbp_rewrite (directly or indirectly): `deploy.check` runs it with
`python -I -c BOOTSTRAP this_file CONFIG.json` after setting `sys.modules['gbp_rewrite'] = None`,
with a working directory outside the repository and no PYTHONPATH, so anything the exported model
secretly needs from our package (a registered gradient, a Python function, a custom op) makes a
check fail here instead of in production.

It reads CONFIG.json ({"export_dir", "source_dir" or null, "work_dir", "batch", "seed",
"forbidden_paths": folders that must not be on sys.path}), and writes work_dir/result.json:

    {"facts": {...}, "op_types": {type: count}, "checks": [{"name", "status", "detail", "why"}],
     "signatures": [{"key", "dir", "inputs": {key: file}, "outputs": {key: file}}]}

status is "pass", "fail" or "skip"; `why` says what TF Serving would do when the check fails.
Probe inputs and outputs are saved as .npy under work_dir/sig_<i>/ so the C++ loader can be run
on exactly the same data.

What it shares with the converter (the export's names, the probe batch, the tolerance, one-line
errors: gbp_rewrite/conventions.py) and the private TensorFlow APIs of the op audit
(gbp_rewrite/tf_internals.py) it loads by file path under other names: both import nothing from
gbp_rewrite and register nothing, so the process stays as clean as TF Serving's. TensorFlow is
imported inside the functions that use it: the facts about the process are taken before it loads,
and the package imports this file (tests do) without paying for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import traceback
from pathlib import Path

import numpy as np


def _package_file(name: str):
    """gbp_rewrite/<name>.py loaded by file path as `gbp_clean_<name>` (see the module docstring)."""
    path = Path(__file__).resolve().parents[1] / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gbp_clean_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


conventions = _package_file("conventions")

SERVE_TAG = "serve"
INIT_OP_KEY = "__saved_model_init_op"
REPORT_PATH = Path(conventions.REPORT_PATH)
EXPLAIN_CLASS = conventions.EXPLAIN_CLASS_SIGNATURE
CLASS_INDEX = conventions.CLASS_INDEX
EXPLAINED_CLASS = conventions.EXPLAINED_CLASS
# The image-bytes signatures: probed with PNGs; explain_class_bytes is asked for the classes
# serving_bytes picked.
IMAGE_BYTES = conventions.IMAGE_BYTES
CLASS_SIGNATURES = {EXPLAIN_CLASS: None, conventions.EXPLAIN_CLASS_BYTES: conventions.SERVING_BYTES}  # None: the explained one
PROBE_IMAGE_SIZES = ((24, 40), (48, 36))  # height, width: images of different sizes share the batch

UNKNOWN_DIM = conventions.UNKNOWN_DIM
PREDICTION_RTOL = conventions.PREDICTION_RTOL
PREDICTION_ATOL = conventions.PREDICTION_ATOL
probe_value = conventions.probe_value

PYTHON_OP = re.compile(r"PyFunc")
# Dtypes TF Serving's REST API (util/json_tensor.cc) can read from JSON, and write to JSON.
REST_INPUT_DTYPES = {"float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32",
                     "uint64", "bool", "string"}
REST_OUTPUT_DTYPES = REST_INPUT_DTYPES | {"float16"}

WHY_PYTHON_OP = "TF Serving has no Python interpreter; the op would fail at run time"
WHY_CUSTOM_OP = ("TF Serving only knows the ops linked into the model server; loading would fail "
                 "with 'Op type not registered' unless the server is rebuilt with the op")
WHY_NO_KERNEL = "the standard kernel set has no CPU kernel for the op; Session::Run would fail"
WHY_NO_SERVE_TAG = "TF Serving loads the meta graph tagged 'serve'; loading would fail"
WHY_LOAD = "TF Serving could not load the model either"
WHY_RUN = "TF Serving would answer every request to this signature with an error"
WHY_BATCH = ("TF Serving's REST row format ('instances'/'predictions') needs every output to keep "
             "the batch dimension; the request would fail with 'inconsistent batch size' or "
             "'has no shape information'")
WHY_DTYPE = "TF Serving's REST API cannot convert this dtype to or from JSON (gRPC still works)"
WHY_PREDICTIONS = "the served model would answer differently from the source model"
WHY_SALIENCY = "the served saliency would be useless"
WHY_NOT_EXPLAINABLE = "the served model would answer with predictions only, no explanation"


class Checks:
    """Collects the check results in order."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, ok: bool | None, detail: str, why: str = "") -> bool:
        status = "skip" if ok is None else ("pass" if ok else "fail")
        self.items.append({"name": name, "status": status, "detail": detail,
                           "why": why if status == "fail" else ""})
        return bool(ok)


# ---------------------------------------------------------------------------------------------
# Facts about this process: proof that it is clean


def process_facts(forbidden: list[str]) -> dict:
    try:
        import gbp_rewrite  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        importable = True
    except ImportError:
        importable = False
    forbidden_paths = {os.path.realpath(p) for p in forbidden}
    return {
        "python": sys.executable,
        "cwd": os.getcwd(),
        "gbp_rewrite_importable": importable,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "repo_on_sys_path": any(os.path.realpath(p or ".") in forbidden_paths for p in sys.path),
    }


def loaded_gbp_modules() -> list[str]:
    return sorted(name for name, module in sys.modules.items()
                  if name.split(".")[0] == "gbp_rewrite" and module is not None)


# ---------------------------------------------------------------------------------------------
# Op audit: read saved_model.pb, never execute anything


def read_serving_meta_graph(export_dir: Path):
    from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    for meta_graph in proto.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    return None


def op_types(meta_graph) -> dict[str, int]:
    """Every op type of the graph and its library functions, with counts; function calls omitted."""
    library = meta_graph.graph_def.library
    functions = {f.signature.name for f in library.function}
    nodes = list(meta_graph.graph_def.node)
    for function in library.function:
        nodes.extend(function.node_def)
    counts: dict[str, int] = {}
    for node in nodes:
        if node.op not in functions:  # a direct call of a library function, not an op
            counts[node.op] = counts.get(node.op, 0) + 1
    return dict(sorted(counts.items()))


def audit_ops(types: dict[str, int], checks: Checks) -> None:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    internals = _package_file("tf_internals")
    python_ops = [t for t in types if PYTHON_OP.search(t)]
    custom = [t for t in types if t not in python_ops and not internals.is_registered_op(t)]
    no_kernel = []
    for t in types:
        if t in python_ops or t in custom:
            continue
        devices = internals.kernel_devices(t)
        if not devices & {"CPU", "DEFAULT"}:
            no_kernel.append(t)
    checks.add("op audit: no Python ops", not python_ops,
               f"Python-callback ops: {', '.join(python_ops)} (tf.py_function / tf.numpy_function)"
               if python_ops else "no PyFunc, PyFuncStateless or EagerPyFunc op", WHY_PYTHON_OP)
    checks.add("op audit: no custom ops", not custom,
               f"not in plain TensorFlow's op registry: {', '.join(custom)}" if custom
               else f"all {len(types)} op types are registered in plain TensorFlow {tf.__version__}",
               WHY_CUSTOM_OP)
    checks.add("op audit: standard CPU kernels", not no_kernel,
               f"no CPU kernel registered for: {', '.join(no_kernel)}" if no_kernel
               else "every registered op type has a CPU kernel", WHY_NO_KERNEL)


# ---------------------------------------------------------------------------------------------
# Running the signatures


def probe_images(batch: int, rng) -> np.ndarray:
    """`batch` PNG-encoded random RGB images, of different sizes: the image-bytes input's probe."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    encoded = []
    for i in range(batch):
        height, width = PROBE_IMAGE_SIZES[i % len(PROBE_IMAGE_SIZES)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        encoded.append(tf.io.encode_png(pixels).numpy())
    return np.array(encoded, dtype=object)


def input_specs(function) -> dict:
    return dict(sorted(function.structured_input_signature[1].items()))


def call(function, arrays: dict) -> dict[str, np.ndarray]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    specs = input_specs(function)
    outputs = function(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in arrays.items()})
    return {k: v.numpy() for k, v in sorted(outputs.items())}


def one_line(error: BaseException) -> str:
    """The error's type, its first informative line, and the node it was detected at."""
    return conventions.one_line(error, with_type=True)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def outputs_equal(got: np.ndarray, want: np.ndarray) -> bool:
    if got.shape != want.shape:
        return False
    if np.issubdtype(want.dtype, np.floating):
        return bool(np.allclose(got, want, rtol=PREDICTION_RTOL, atol=PREDICTION_ATOL))
    return bool(np.array_equal(got, want))


def signature_order(keys: list[str], explained: str | None) -> list[str]:
    """The explained signature first: explain_class is probed with the classes it picked."""
    return sorted(keys, key=lambda k: (k != explained, k in CLASS_SIGNATURES, k))


def run_signatures(loaded, explained: str | None, config: dict, checks: Checks) -> list[dict]:
    """Run every signature on a probe batch; save inputs and outputs; check batch dims and saliency.

    `explained`: the signature the conversion report names, run first (None: no report).
    """
    work = Path(config["work_dir"])
    keys = signature_order([k for k in loaded.signatures if k != INIT_OP_KEY], explained)
    results = []
    for index, key in enumerate(keys):
        function = loaded.signatures[key]
        rng = np.random.default_rng(config["seed"])
        specs = input_specs(function)
        probe = {k: probe_images(config["batch"], rng) if k == IMAGE_BYTES and s.dtype.name == "string"
                 else probe_value(s, config["batch"], rng) for k, s in specs.items()}
        class_source = CLASS_SIGNATURES.get(key, None) or explained
        top_classes = next((r["outputs_np"].get(EXPLAINED_CLASS) for r in results
                            if r["key"] == class_source), None)
        if key in CLASS_SIGNATURES and CLASS_INDEX in probe and top_classes is not None:
            probe[CLASS_INDEX] = top_classes.astype(probe[CLASS_INDEX].dtype)
        entry = {"key": key, "dir": str(work / f"sig_{index}"), "inputs_np": probe, "outputs_np": {},
                 "declared": list(function.structured_outputs)}
        results.append(entry)
        try:
            entry["outputs_np"] = call(function, probe)
        except Exception as e:  # noqa: BLE001 - whatever breaks is the finding
            checks.add(f"runs: {key}", False, f"fails on a probe batch: {one_line(e)}", WHY_RUN)
            continue
        shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in entry["outputs_np"].items())
        checks.add(f"runs: {key}", True, f"probe batch of {config['batch']} -> {shapes}")
        check_rest_format(key, specs, probe, entry["outputs_np"], checks)
        check_saliency(key, entry["outputs_np"], checks)
    return results


def check_rest_format(key: str, specs: dict, probe: dict, outputs: dict, checks: Checks) -> None:
    batch = next((v.shape[0] for v in probe.values() if v.ndim), None)  # row format: inputs share it
    lost = [k for k, v in outputs.items() if v.ndim == 0 or v.shape[0] != batch]
    checks.add(f"REST row format: {key}", not lost,
               f"outputs without the batch dimension {batch}: {', '.join(lost)}" if lost
               else f"every output keeps the batch dimension ({batch})", WHY_BATCH)
    bad = [f"input {k} {s.dtype.name}" for k, s in specs.items() if s.dtype.name not in REST_INPUT_DTYPES]
    bad += [f"output {k} {v.dtype}" for k, v in outputs.items()
            if (v.dtype.name if v.dtype != object else "string") not in REST_OUTPUT_DTYPES]
    if bad:
        checks.add(f"REST dtypes: {key}", False, "; ".join(bad), WHY_DTYPE)


def saliency_keys(outputs: dict) -> list[str]:
    return [k for k in outputs if k == "saliency" or k.startswith("saliency_")]


def check_saliency(key: str, outputs: dict, checks: Checks) -> None:
    for name in saliency_keys(outputs):
        value = outputs[name]
        if not np.issubdtype(value.dtype, np.floating):
            continue
        finite = bool(np.all(np.isfinite(value)))
        nonzero = bool(np.any(value != 0)) if finite else False
        zero_examples = int(sum(not np.any(v) for v in value)) if value.ndim else 0
        detail = (f"finite, max |{name}| {float(np.max(np.abs(value))):.3g}"
                  + (f", {zero_examples} example(s) all zero" if zero_examples else "")
                  if finite and nonzero else
                  f"{name} is {'all zero' if finite else 'not finite (NaN or Inf)'} on the probe batch")
        checks.add(f"saliency: {key}/{name}", finite and nonzero, detail, WHY_SALIENCY)


def check_explainable(results: list[dict], checks: Checks) -> None:
    """A model never converted returns no saliency: verifying it would otherwise pass."""
    explaining = [r["key"] for r in results if saliency_keys(r["declared"])]
    checks.add("explainable outputs", bool(explaining),
               f"saliency returned by {', '.join(explaining)}" if explaining else
               "no signature returns a saliency output: this SavedModel was never converted; run "
               "`gbp-rewrite convert SRC DST` and verify DST", WHY_NOT_EXPLAINABLE)


def check_explain_class(results: list[dict], explained: str | None, checks: Checks) -> None:
    """explain_class (and explain_class_bytes), asked for the top classes, must reproduce the
    explained signature (serving_bytes) exactly."""
    by_key = {r["key"]: r["outputs_np"] for r in results}
    for class_key, source_key in CLASS_SIGNATURES.items():
        source_key = source_key or explained
        main, by_class = by_key.get(source_key), by_key.get(class_key)
        if not main or not by_class:
            continue
        differ = [k for k in main if k in by_class and not np.array_equal(main[k], by_class[k])]
        checks.add(f"consistency: {class_key} vs {source_key}", not differ,
                   f"outputs differ for the same classes: {', '.join(differ)}" if differ
                   else "same outputs for the top classes", WHY_SALIENCY)


def compare_with_source(results: list[dict], source_dir: str, explained: str | None, checks: Checks) -> None:
    """Same probe inputs through the source's signature of the same key: same predictions."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    try:
        try:
            source = tf.saved_model.load(source_dir, tags=[SERVE_TAG])
        except (RuntimeError, ValueError):
            source = tf.saved_model.load(source_dir)
    except Exception as e:  # noqa: BLE001
        checks.add("source model loads", False, f"cannot load {source_dir}: {one_line(e)}")
        return
    compared = 0
    for entry in results:
        # explain_class has no counterpart in the source: it mirrors the explained signature.
        source_key = explained if entry["key"] == EXPLAIN_CLASS else entry["key"]
        if source_key not in source.signatures or not entry["outputs_np"]:
            continue
        function = source.signatures[source_key]
        wanted = input_specs(function)
        missing = sorted(set(wanted) - set(entry["inputs_np"]))
        if missing:
            checks.add(f"predictions: {entry['key']}", False,
                       f"the source's {source_key!r} takes inputs the export lacks: {', '.join(missing)}",
                       WHY_PREDICTIONS)
            continue
        try:
            expected = call(function, {k: entry["inputs_np"][k] for k in wanted})
        except Exception as e:  # noqa: BLE001
            checks.add(f"predictions: {entry['key']}", False,
                       f"the source's {source_key!r} fails on the probe batch: {one_line(e)}")
            continue
        got = entry["outputs_np"]
        common = [k for k in expected if k in got]
        differ = [k for k in common if not outputs_equal(got[k], expected[k])]
        worst = max([max_diff(got[k], expected[k]) for k in common], default=0.0)
        if not common:
            detail, ok = f"no output key in common with the source's {source_key!r}", False
        elif differ:
            detail, ok = f"{', '.join(differ)} differ from the source's (max abs difference {worst:.3g})", False
        else:
            detail, ok = (f"{', '.join(common)} equal the source's {source_key!r} "
                          f"(max abs difference {worst:.3g})"), True
        checks.add(f"predictions: {entry['key']}", ok, detail, WHY_PREDICTIONS)
        compared += 1
    if not compared:
        checks.add("predictions", False, f"no signature of the export matches one of the source "
                   f"({', '.join(sorted(source.signatures))})", WHY_PREDICTIONS)


WARMUP_FILE = Path(conventions.WARMUP_PATH)
WHY_WARMUP = ("TF Serving replays the warm-up requests when it loads the model and fails the load "
              "if one fails or the file does not parse")


def check_warmup(export_dir: Path, loaded, checks: Checks) -> None:
    """The warm-up file (if any) parses as TFRecord of PredictionLog and each request runs."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    path = export_dir / WARMUP_FILE
    if not path.is_file():
        return
    name = f"warm-up requests: {WARMUP_FILE}"
    try:
        from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=import-outside-toplevel
    except ImportError:
        checks.add(name, None, "tensorflow-serving-api is not installed, so the file cannot be read "
                   "(pip install tensorflow-serving-api)")
        return
    ran = []
    try:
        for index, record in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator()):
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") != "predict_log":
                raise ValueError(f"record {index} is a {log.WhichOneof('log_type')}, not a predict_log")
            request = log.predict_log.request
            key = request.model_spec.signature_name or "serving_default"
            if key not in loaded.signatures:
                raise ValueError(f"record {index} calls signature {key!r}, which the model lacks")
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            call(loaded.signatures[key], inputs)
            ran.append(key)
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        checks.add(name, False, f"{one_line(e)} (after {len(ran)} good requests)", WHY_WARMUP)
        return
    checks.add(name, bool(ran), f"{len(ran)} requests parse and run: {', '.join(ran)}"
               if ran else "the file holds no request", WHY_WARMUP)


def save_arrays(results: list[dict]) -> list[dict]:
    """Write probe inputs and outputs as .npy; return the JSON-able description."""
    described = []
    for entry in results:
        directory = Path(entry["dir"])
        directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for kind in ("inputs", "outputs"):
            files[kind] = {}
            for name, value in entry[f"{kind}_np"].items():
                if value.dtype == object:  # strings: the C++ check reads numpy 'S' arrays
                    value = value.astype(bytes)
                path = directory / f"{kind}_{len(files[kind])}.npy"
                np.save(path, value)
                files[kind][name] = str(path)
        described.append({"key": entry["key"], "dir": entry["dir"], **files})
    return described


# ---------------------------------------------------------------------------------------------


def main(config: dict) -> dict:
    checks = Checks()
    facts = process_facts(config.get("forbidden_paths", []))
    clean = not facts["gbp_rewrite_importable"] and not facts["repo_on_sys_path"]
    checks.add("clean process: gbp_rewrite not importable", clean,
               f"python {facts['python']}, cwd {facts['cwd']}, PYTHONPATH "
               f"{facts['pythonpath'] or '(unset)'}, `import gbp_rewrite` fails" if clean
               else "gbp_rewrite is importable or the repository is on sys.path: the check is not clean")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    facts["tensorflow"] = tf.__version__
    export_dir = Path(config["export_dir"])
    result = {"facts": facts, "op_types": {}, "checks": checks.items, "signatures": []}
    meta_graph = read_serving_meta_graph(export_dir)
    if not checks.add("tag 'serve'", meta_graph is not None,
                      "a meta graph is tagged 'serve'" if meta_graph is not None
                      else "no meta graph is tagged 'serve'", WHY_NO_SERVE_TAG):
        return result
    facts["written_by_tensorflow"] = meta_graph.meta_info_def.tensorflow_version
    result["op_types"] = op_types(meta_graph)
    audit_ops(result["op_types"], checks)

    report = None
    if (export_dir / REPORT_PATH).is_file():
        report = json.loads((export_dir / REPORT_PATH).read_text(encoding="utf-8"))
    try:
        loaded = tf.saved_model.load(str(export_dir), tags=[SERVE_TAG])
    except Exception as e:  # noqa: BLE001
        checks.add("loads in plain TensorFlow", False, one_line(e), WHY_LOAD)
        return result
    checks.add("loads in plain TensorFlow", True,
               f"tf.saved_model.load(tags=['serve']) with TensorFlow {tf.__version__}")
    explained = (report or {}).get("signature")
    results = run_signatures(loaded, explained, config, checks)
    check_explainable(results, checks)
    check_explain_class(results, explained, checks)
    check_warmup(export_dir, loaded, checks)
    if config.get("source_dir"):
        compare_with_source(results, config["source_dir"], explained, checks)
    result["signatures"] = save_arrays(results)
    leaked = loaded_gbp_modules()
    if leaked:
        checks.add("clean process: gbp_rewrite not importable", False,
                   f"gbp_rewrite modules were loaded: {', '.join(leaked)}")
    return result


def _run_from_command_line() -> int:
    config = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    out = Path(config["work_dir"]) / "result.json"
    try:
        result = main(config)
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line plus the traceback
        result = {"crash": one_line(e), "traceback": traceback.format_exc()}
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_run_from_command_line())
