"""BatchNorm folding: the folded explainable graph computes what the unfolded one computes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import gbp_rewrite
from conftest import assert_close_relative
from gbp_rewrite.graph.fold_batchnorm import fold_batchnorm


def _bn_model(keras):
    """Foldable: Conv2D+bias+BN, Conv2D without bias+BN, DepthwiseConv2D+BN. Not foldable: a conv
    whose output is also used elsewhere, and a BN after a Dense layer."""
    layers = keras.layers
    keras.utils.set_random_seed(3)
    x_in = keras.Input((10, 10, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="c1")(x_in)
    x = layers.ReLU(name="r1")(layers.BatchNormalization(name="bn1")(x))
    x = layers.Conv2D(6, 3, padding="same", use_bias=False, name="c2")(x)
    x = layers.ReLU(max_value=6, name="r2")(layers.BatchNormalization(name="bn2")(x))
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False, name="dw")(x)
    x = layers.ReLU(max_value=6, name="r3")(layers.BatchNormalization(name="bn3")(x))
    shared = layers.Conv2D(4, 1, name="c4")(x)  # used twice: must not fold
    x = layers.Add(name="add")([layers.BatchNormalization(name="bn4")(shared), shared])
    x = layers.Flatten()(layers.ReLU(name="r4")(x))
    x = layers.Dense(8, name="fc")(x)
    x = layers.ReLU(name="r5")(layers.BatchNormalization(name="bn5")(x))
    model = keras.Model(x_in, layers.Dense(3, name="logits")(x))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(-2, 2, gamma.shape), rng.normal(0, 1, beta.shape),
                               rng.normal(0, 1, mean.shape), rng.uniform(0.2, 3, var.shape)])
    return model


@pytest.fixture(scope="module")
def bn_source(tmp_path_factory):
    import keras

    path = tmp_path_factory.mktemp("bn") / "model"
    _bn_model(keras).export(str(path), verbose=False)
    return path


@pytest.fixture(scope="module")
def exports(bn_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("bn_exports")
    return {
        fold: (root / str(fold), gbp_rewrite.convert(bn_source, root / str(fold), fold_batchnorms=fold))
        for fold in (True, False)
    }


def test_exactly_the_conv_batchnorm_pairs_are_folded(bn_source):
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((bn_source / "saved_model.pb").read_bytes())
    folded = fold_batchnorm(proto.meta_graphs[0].graph_def.library.function)
    layers = sorted({name.split("/")[-3].rsplit("_", 1)[0] for name in folded})
    assert layers == ["bn1", "bn2", "bn3"], folded


def _folded_layers(saved_model_dir) -> list[str]:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    folded = fold_batchnorm(proto.meta_graphs[0].graph_def.library.function)
    return sorted({name.split("/")[-3].rsplit("_", 1)[0] for name in folded})


def test_a_batchnorm_is_folded_only_where_it_saves_work(tmp_path):
    """Folding scales the kernel on every call: worth it for 16x16x8 activations per example and a
    3x3x3x8 kernel (2048 against 216), not for 2x2x64 and a 3x3x8x64 kernel (256 against 4608)."""
    import keras

    layers = keras.layers
    x_in = keras.Input((16, 16, 3), name="image")
    x = layers.ReLU()(layers.BatchNormalization(name="bn_early")(layers.Conv2D(8, 3, padding="same", name="early")(x_in)))
    x = layers.MaxPooling2D(8)(x)
    x = layers.ReLU()(layers.BatchNormalization(name="bn_late")(layers.Conv2D(64, 3, padding="same", name="late")(x)))
    model = keras.Model(x_in, layers.Dense(3)(layers.Flatten()(x)))
    model.export(str(tmp_path / "model"), verbose=False)
    assert _folded_layers(tmp_path / "model") == ["bn_early"]


def test_folded_and_unfolded_exports_agree(exports):
    (folded_dir, folded_report), (plain_dir, plain_report) = exports[True], exports[False]
    assert folded_report.checks["batchnorm folding"].startswith("3 BatchNorms folded")
    assert "batchnorm folding" not in plain_report.checks
    x = tf.constant(np.random.default_rng(1).uniform(0, 1, (4, 10, 10, 3)).astype(np.float32))
    folded = tf.saved_model.load(str(folded_dir)).signatures["serving_default"](image=x)
    plain = tf.saved_model.load(str(plain_dir)).signatures["serving_default"](image=x)
    for key in ("output_0", "saliency"):
        assert_close_relative(folded[key].numpy(), plain[key].numpy())
    np.testing.assert_array_equal(folded["explained_class"].numpy(), plain["explained_class"].numpy())


def test_unfolded_export_keeps_the_source_arithmetic(bn_source, exports):
    plain_dir, _ = exports[False]
    x = tf.constant(np.random.default_rng(2).uniform(0, 1, (4, 10, 10, 3)).astype(np.float32))
    source = tf.saved_model.load(str(bn_source))
    explained = tf.saved_model.load(str(plain_dir))
    np.testing.assert_array_equal(
        explained.signatures["serving_default"](image=x)["output_0"].numpy(),
        source.signatures["serving_default"](image=x)["output_0"].numpy(),
    )


def test_folded_graph_has_no_batchnorm_multiply_left(exports):
    """The explainable signature runs folded copies of the source's functions (`..._gbp_folded`);
    the kept `serve` signature keeps the source's own, unfolded ones."""
    folded_dir, _ = exports[True]
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((folded_dir / "saved_model.pb").read_bytes())
    functions = proto.meta_graphs[0].graph_def.library.function
    folded = [n.name for f in functions if "_gbp_folded" in f.signature.name for n in f.node_def if n.op == "Mul"]
    unfolded = [n.name for f in functions if "_gbp_folded" not in f.signature.name for n in f.node_def if n.op == "Mul"]
    assert folded, "the explainable signature does not run the folded copies"
    for layer in ("bn1", "bn2", "bn3"):
        assert not [n for n in folded if n.endswith(f"/{layer}_1/batchnorm/mul_1")], layer
        assert [n for n in unfolded if n.endswith(f"/{layer}_1/batchnorm/mul_1")], layer
    assert [n for n in folded if n.endswith("/bn4_1/batchnorm/mul_1")], "bn4 (conv output used twice) must stay"


def test_a_batchnorm_before_a_swish_converts_with_folding_on(tmp_path):
    """Keras' swish is tf.nn.silu, a saved tf.custom_gradient whose restored gradient is bound to the
    source function's tensors: the folded twin could not use it, and saving failed (EfficientNet).
    The conversion must work with the default --fold_batchnorms and give TF's own gradient."""
    import keras

    layers = keras.layers
    keras.utils.set_random_seed(5)
    x_in = keras.Input((8, 8, 3), name="image")
    x = layers.BatchNormalization(name="bn")(layers.Conv2D(4, 3, use_bias=False, name="conv")(x_in))
    x = layers.GlobalAveragePooling2D()(layers.Activation("swish", name="act")(x))
    model = keras.Model(x_in, layers.Dense(3, name="logits")(x))
    model.export(str(tmp_path / "src"), verbose=False)
    gbp_rewrite.convert(tmp_path / "src", tmp_path / "dst", rule="vanilla")
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 8, 8, 3)), tf.float32)
    outputs = tf.saved_model.load(str(tmp_path / "dst")).signatures["serving_default"](image=x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model(x)
        score = tf.reduce_sum(logits * tf.one_hot(tf.argmax(logits, -1), 3))
    np.testing.assert_array_equal(outputs["explained_class"], tf.argmax(logits, -1).numpy())
    assert_close_relative(outputs["saliency"].numpy(), tape.gradient(score, x).numpy())
