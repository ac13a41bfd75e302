"""Conversions that used to go wrong: a Keras model with a lookup table, the export's fingerprint,
and the "rule applied" count when several functions hold ops of the same name."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import gbp_rewrite


def _lookup_model(keras):
    """A float image beside an int token that goes through IntegerLookup (a hash table) + Embedding."""
    keras.utils.set_random_seed(3)
    image = keras.Input((8, 8, 3), name="image")
    token = keras.Input((1,), dtype="int64", name="token")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(image)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    t = keras.layers.IntegerLookup(vocabulary=[10, 20, 30], name="lookup")(token)
    t = keras.layers.Embedding(5, 4, name="embed")(t)
    t = keras.layers.Flatten(name="flatten")(t)
    x = keras.layers.Concatenate(name="concat")([x, t])
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model([image, token], outputs, name="with_lookup")


def test_keras_model_with_a_lookup_table(tmp_path):
    import keras

    model = _lookup_model(keras)
    report = gbp_rewrite.convert(model, tmp_path / "out")
    assert len(report.rewritten) == 1

    rng = np.random.default_rng(0)
    image = rng.random((4, 8, 8, 3)).astype(np.float32)
    token = np.array([[10], [20], [30], [99]], dtype=np.int64)  # 99: out of vocabulary
    want = model.predict([image, token], verbose=0)
    served = tf.saved_model.load(str(tmp_path / "out")).signatures["serving_default"]
    got = served(image=tf.constant(image), token=tf.constant(token))
    np.testing.assert_allclose(got["output_0"].numpy(), want, rtol=1e-5, atol=1e-6)
    saliency = got["saliency"].numpy()
    assert saliency.shape == image.shape
    assert np.all(np.isfinite(saliency)) and np.abs(saliency).max() > 0


def test_export_fingerprint_describes_the_written_graph(zoo, tmp_path):
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    export_dir = tmp_path / "out"
    gbp_rewrite.convert(zoo.model("keras3@mlp"), export_dir)
    written = tf.saved_model.experimental.read_fingerprint(str(export_dir))
    fresh = fingerprint_pb2.FingerprintDef.FromString(fingerprinting.CreateFingerprintDef(str(export_dir)))
    assert written.saved_model_checksum == fresh.saved_model_checksum


class _TwoBranches(tf.Module):
    """Outputs a = fa(x) and b = stop_gradient(fb(x)): two functions, each with a node named Relu."""

    def __init__(self):
        super().__init__()
        self.wa = tf.Variable(tf.random.stateless_normal([4, 3], seed=[1, 2]))
        self.wb = tf.Variable(tf.random.stateless_normal([4, 3], seed=[3, 4]))

    @tf.function(autograph=False)
    def fa(self, x):
        return tf.nn.relu(tf.matmul(x, self.wa))

    @tf.function(autograph=False)
    def fb(self, x):
        return tf.nn.relu(tf.matmul(x, self.wb))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")], autograph=False)
    def serve(self, x):
        return {"a": self.fa(x), "b": tf.stop_gradient(self.fb(x))}


def test_rule_applied_counts_only_ops_whose_gradient_was_built(tmp_path):
    module = _TwoBranches()
    source = tmp_path / "two_branches"
    tf.saved_model.save(module, str(source), signatures={"serving_default": module.serve})
    report = gbp_rewrite.convert(source, tmp_path / "out", output="a")
    assert [s.op_name for s in report.sites] == ["Relu", "Relu"]  # same name, two functions
    assert report.checks["rule applied"].startswith("guided gradient built for 1 of 2 selected ReLU ops")


def test_recorded_gradients_stay_with_their_thread():
    """A conversion records only the gradients built on its own thread, not a concurrent one's."""
    import threading

    from gbp_rewrite import rules

    recording, built, seen = threading.Event(), threading.Event(), {}

    def other_conversion():
        with rules.record_applications() as applied:
            recording.set()
            built.wait(timeout=60)
        seen["other"] = set(applied)

    thread = threading.Thread(target=other_conversion)
    thread.start()
    recording.wait(timeout=60)
    x = tf.constant([[-1.0, 2.0]])
    with rules.record_applications() as applied:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = rules.activation("guided", "Relu", name="mine")(x)
        tape.gradient(y, x)
    built.set()
    thread.join(timeout=60)
    assert applied == {"mine", rules.forward_token("mine")} and seen["other"] == set()
