"""The exported signatures are safe to call from many threads (issue #7): 8 threads x 50 calls of
serving_default and explain_class give exactly the results of the same calls made one at a time,
for a model with BatchNorm and for a TF1 graph."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tensorflow as tf

from gbp_rewrite.graph import savedmodel

THREADS = 8
CALLS = 50
BATCHES = 12


def _batches(signature, seed=0) -> list[dict[str, np.ndarray]]:
    """BATCHES different inputs of 1 to 4 examples each, with a class to explain per example."""
    rng = np.random.default_rng(seed)
    specs = signature.structured_input_signature[1]
    batches = []
    for index in range(BATCHES):
        size = 1 + index % 4
        batch = {key: rng.normal(0, 2, [size, *spec.shape[1:]]).astype(spec.dtype.as_numpy_dtype)
                 for key, spec in specs.items()}
        batch["class_index"] = rng.integers(0, 5, size).astype(np.int64)
        batches.append(batch)
    return batches


def _call(loaded, signature: str, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = {k: tf.constant(v) for k, v in batch.items() if signature == "explain_class" or k != "class_index"}
    return {k: v.numpy() for k, v in loaded.signatures[signature](**inputs).items()}


def _plan(thread: int, call: int) -> tuple[str, int]:
    """Which signature and batch a given call uses: every thread mixes both, in its own order."""
    signature = ("serving_default", "explain_class")[(thread + call) % 2]
    return signature, (thread * 5 + call * 7) % BATCHES


@pytest.mark.parametrize("name", ["keras3@residual_bn", "tf1@cnn"])
def test_threads_get_the_sequential_results(zoo, name):
    if name == "keras3@residual_bn":
        graph = savedmodel.read(zoo.model(name)).meta_graph.graph_def
        assert any("batchnorm" in node.name for f in graph.library.function for node in f.node_def)
    export_dir, _ = zoo.converted(name)
    loaded = tf.saved_model.load(str(export_dir))
    batches = _batches(loaded.signatures["serving_default"])
    expected = {(signature, index): _call(loaded, signature, batch)
                for signature in ("serving_default", "explain_class") for index, batch in enumerate(batches)}
    assert any(np.abs(out["saliency"]).max() > 0 for out in expected.values()), "all-zero saliency proves little"

    results: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(thread: int) -> None:
        try:
            start.wait()
            for call in range(CALLS):
                signature, index = _plan(thread, call)
                results[(thread, call)] = _call(loaded, signature, batches[index])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert len(results) == THREADS * CALLS
    for (thread, call), got in results.items():
        want = expected[_plan(thread, call)]
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"thread {thread} call {call} {key}")
