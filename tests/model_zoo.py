"""Builders of the small models the tests convert, one per SavedModel family and structure.

A builder that takes a `path` writes a model there and returns the path; the other builders
return a keras.Model (to export, convert or clone). Weights come from fixed
seeds or from a numpy_reference layer spec, so the same function can be built as a Keras 3 export,
a tf-keras SavedModel, a TF1 SavedModelBuilder graph and a TF2 tf.Module, and each checked against
the numpy reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

import fingerprints
import numpy_reference as ref

tree_digest = fingerprints.tree_digest  # the tests prove a source untouched with model_zoo.tree_digest

# ---------------------------------------------------------------------------------------------
# Spec -> TensorFlow ops (TF1 graphs and TF2 modules share these)


def _conv(x, layer, kernel, bias):
    strides = ref._pair(layer.get("strides", 1))
    y = tf.nn.conv2d(x, kernel, strides=[1, *strides, 1], padding=layer.get("padding", "valid").upper())
    return y + bias if bias is not None else y


def _activation(x, name):
    if name in (None, "linear"):
        return x
    return {"relu": tf.nn.relu, "relu6": tf.nn.relu6, "softmax": tf.nn.softmax}[name](x)


def _apply(layers, x, weights):
    """Apply spec layers with tf ops; `weights(layer, key)` returns the tensor for a weight."""
    for i, layer in enumerate(layers):
        kind = layer["type"]
        name = layer.get("name") or f"{kind}_{i}"
        with tf.name_scope(name):
            if kind == "conv2d":
                x = _activation(_conv(x, layer, weights(layer, "kernel"), weights(layer, "bias")), layer.get("activation"))
            elif kind == "dense":
                y = tf.matmul(x, weights(layer, "kernel"))
                if layer.get("bias") is not None:
                    y = y + weights(layer, "bias")
                x = _activation(y, layer.get("activation"))
            elif kind == "relu":
                x = tf.nn.relu(x)
            elif kind == "relu6":
                x = tf.nn.relu6(x)
            elif kind == "maxpool":
                pool, strides = ref._maxpool_geometry(layer)
                x = tf.nn.max_pool2d(x, pool, strides, "VALID")
            elif kind == "flatten":
                x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])
            elif kind == "gap":
                x = tf.reduce_mean(x, axis=[1, 2])
            elif kind == "batchnorm":
                x = tf.nn.batch_normalization(
                    x, weights(layer, "mean"), weights(layer, "var"), weights(layer, "beta"),
                    weights(layer, "gamma"), float(layer.get("epsilon", 1e-3)))
            elif kind == "softmax":
                x = tf.nn.softmax(x)
            elif kind == "residual":
                x = x + _apply(layer["layers"], x, weights)
            else:
                raise ValueError(kind)
    return x


def _weight_keys(layer):
    return [k for k in ("kernel", "bias", "gamma", "beta", "mean", "var") if layer.get(k) is not None]


def _all_layers(layers):
    for layer in layers:
        yield layer
        if layer["type"] == "residual":
            yield from _all_layers(layer["layers"])


# ---------------------------------------------------------------------------------------------
# Families


def spec_keras3(spec, input_shape, path: Path) -> Path:
    model = ref.keras_model(spec, input_shape)
    model.export(str(path), verbose=False)
    return path


def spec_tf_keras(spec, input_shape, path: Path) -> Path:
    import tf_keras

    inputs = tf_keras.Input(shape=tuple(input_shape), name="image")
    outputs = ref._keras_layers(tf_keras, spec, inputs)
    model = tf_keras.Model(inputs, outputs, name="ref_model")
    model.save(str(path), save_format="tf")
    return path


def spec_tf1(spec, input_shape, path: Path) -> Path:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, *input_shape], name="image")
        variables = {}

        def weights(layer, key):
            ident = (id(layer), key)
            if ident not in variables:
                # Legacy VariableV2 (ref) variables, named by the enclosing name scope.
                variables[ident] = tf.compat.v1.Variable(
                    np.asarray(layer[key], np.float32), name=key, use_resource=False)
            return variables[ident]

        y = _apply(spec, x, weights)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(path))
            signature = tf.compat.v1.saved_model.predict_signature_def({"image": x}, {"scores": y})
            builder.add_meta_graph_and_variables(
                session, ["serve"], signature_def_map={"serving_default": signature})
            builder.save()
    return path


class _SpecLayer(tf.Module):
    """One spec layer as a tf.Module with its own tf.function: a nested function per layer."""

    def __init__(self, layer):
        super().__init__(name=layer.get("name"))
        # Weight values live in variables; the layer dict keeps `True` so `_apply` sees they exist.
        self.layer = {k: (True if k in _weight_keys(layer) else v) for k, v in layer.items() if k != "layers"}
        self.weights = {k: tf.Variable(np.asarray(layer[k], np.float32), name=k) for k in _weight_keys(layer)}
        self.inner = [_SpecLayer(l) for l in layer.get("layers", [])]

    @tf.function
    def __call__(self, x):
        if self.inner:
            with tf.name_scope(self.layer.get("name") or "residual"):
                y = x
                for module in self.inner:
                    y = module(y)
                return x + y
        return _apply([self.layer], x, lambda layer, key: self.weights[key])


class _SpecModule(tf.Module):
    def __init__(self, spec, input_shape):
        super().__init__(name="spec_module")
        self.blocks = [_SpecLayer(layer) for layer in spec]
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name="image")])

    def _serve(self, image):
        x = image
        for block in self.blocks:
            x = block(x)
        return {"scores": x}


def spec_tf2_module(spec, input_shape, path: Path) -> Path:
    module = _SpecModule(spec, input_shape)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


FAMILIES = {
    "keras3": spec_keras3,
    "tf_keras": spec_tf_keras,
    "tf1": spec_tf1,
    "tf2_module": spec_tf2_module,
}


# ---------------------------------------------------------------------------------------------
# Structures: one Keras 3 model holding every construct the issue names


def kitchen_sink_keras3(keras, *, seed=0):
    """Nested model, a shared layer called twice, ReLU6 (two spellings), residual block,
    BatchNorm, a standalone ReLU layer and a softmax head; weights scaled so ReLU6 saturates."""
    layers = keras.layers
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3), name="image")
    shared = layers.Conv2D(3, 3, padding="same", activation="relu", name="shared")
    x = shared(inputs)
    x = shared(x)  # second call site of the same layer
    inner_in = keras.Input((12, 12, 3))
    h = layers.Conv2D(6, 3, padding="same", name="inner_conv")(inner_in)
    h = layers.BatchNormalization(name="inner_bn")(h)
    h = layers.ReLU(max_value=6, name="inner_relu6")(h)
    block = keras.Model(inner_in, h, name="block")
    x = block(x)
    r = layers.Conv2D(6, 3, padding="same", activation="relu", name="res_conv")(x)
    x = layers.Add(name="res_add")([x, r])
    x = layers.Activation("relu6", name="act6")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(16, name="fc")(x)
    x = layers.ReLU(name="fc_relu")(x)
    outputs = layers.Dense(5, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs, name="sink")
    _spread_weights(model, seed)
    return model


def _spread_weights(model, seed):
    """Scale weights and BatchNorm statistics so that units are negative, positive and > 6."""
    rng = np.random.default_rng(seed)
    for layer in _leaf_layers(model):
        weights = layer.get_weights()
        if not weights:
            continue
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = weights
            layer.set_weights([
                rng.uniform(0.5, 3.0, gamma.shape).astype(np.float32),
                rng.normal(1.0, 2.0, beta.shape).astype(np.float32),
                rng.normal(0.0, 1.0, mean.shape).astype(np.float32),
                rng.uniform(0.5, 2.0, var.shape).astype(np.float32),
            ])
        else:
            kernel, *rest = weights
            layer.set_weights([kernel * 2.0] + [rng.normal(0.0, 0.5, b.shape).astype(np.float32) for b in rest])


def _leaf_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _leaf_layers(layer)
        else:
            yield layer


def multi_io_keras3(keras, *, seed=0):
    """Two float inputs and an integer input; two outputs (class probabilities and a box)."""
    layers = keras.layers
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 3), name="image")
    meta = keras.Input((4,), name="meta")
    flag = keras.Input((1,), dtype="int32", name="flag")
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(image)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    m = layers.Dense(4, activation="relu", name="meta_fc")(meta)
    f = layers.Flatten(name="flag_flat")(layers.Embedding(3, 2, name="flag_embed")(flag))
    h = layers.Concatenate(name="concat")([x, m, f])
    h = layers.Dense(8, activation="relu", name="trunk")(h)
    probs = layers.Dense(3, activation="softmax", name="cls")(h)
    box = layers.Dense(4, name="box")(h)
    model = keras.Model({"image": image, "meta": meta, "flag": flag}, {"cls": probs, "box": box}, name="multi")
    _spread_weights(model, seed)
    return model


def no_relu_keras3(keras):
    layers = keras.layers
    inputs = keras.Input((6,), name="x")
    x = layers.Dense(4, activation="sigmoid", name="hidden")(inputs)
    x = layers.LeakyReLU(negative_slope=0.1, name="leaky")(x)
    outputs = layers.Dense(2, name="out")(x)
    return keras.Model(inputs, outputs)


def int_input_module(path: Path) -> Path:
    class Tokens(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.Variable(np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.int32, name="tokens")])
        def serve(self, tokens):
            return {"scores": tf.nn.relu(tf.reduce_sum(tf.gather(self.table, tokens), axis=1))}

    module = Tokens()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def string_input_module(path: Path) -> Path:
    class Text(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text):
            return {"score": tf.nn.relu(tf.strings.to_number(text))[:, None]}

    module = Text()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def relu6_hand_module(path: Path) -> Path:
    """score = relu6(8 x0) + relu6(2 x1) - relu6(3 x2): at x = [1, .5, .5] the first unit is
    saturated (8 > 6) and the third gets a negative upstream gradient. By hand:
        vanilla   [0, 2, -3]    guided [0, 2, 0]    deconvnet [8, 2, 0]"""

    class Hand(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable([8.0, 2.0, 3.0])
            self.sign = tf.Variable([[1.0], [1.0], [-1.0]])

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x):
            with tf.name_scope("units"):
                hidden = tf.nn.relu6(x * self.scale)
            return {"score": tf.matmul(hidden, self.sign)}

    module = Hand()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def float16_spec():
    """The numpy_reference spec of float16_module: conv (no bias) + ReLU, flatten, dense (no bias).
    The weights are float16 values (held in float64), so the reference sees the model's own."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float16)
    dense = rng.normal(size=(6 * 6 * 4, 3)).astype(np.float16)
    return [
        {"type": "conv2d", "name": "conv", "kernel": kernel.astype(np.float64), "bias": None, "activation": "relu"},
        {"type": "flatten"},
        {"type": "dense", "name": "dense", "kernel": dense.astype(np.float64), "bias": None},
    ]


def float16_module(path: Path) -> Path:
    """A half-precision model end to end: float16 input, conv, ReLU, dense, float16 scores."""
    conv, _, dense = float16_spec()

    class Half(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(conv["kernel"].astype(np.float16))
            self.dense = tf.Variable(dense["kernel"].astype(np.float16))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float16, name="image")])
        def serve(self, image):
            with tf.name_scope("conv"):
                h = tf.nn.relu(tf.nn.conv2d(image, self.kernel, 1, "VALID"))
            return {"scores": tf.matmul(tf.reshape(h, [-1, 6 * 6 * 4]), self.dense)}

    module = Half()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def mixed_float16_keras3(keras, *, seed=0, batchnorm=False, float16_output=False):
    """Keras 3 with the mixed_float16 policy: float32 input, float16 compute and a softmax head
    computed in float32 (in float16 with `float16_output`); `batchnorm` adds a BatchNormalization
    between the conv's ReLU and the ReLU6."""
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((8, 8, 3), name="image")
        x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
        if batchnorm:
            x = keras.layers.BatchNormalization(name="bn")(x)
        x = keras.layers.ReLU(max_value=6, name="act6")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        head_dtype = None if float16_output else "float32"  # None: the mixed_float16 policy
        outputs = keras.layers.Dense(3, activation="softmax", dtype=head_dtype, name="probs")(x)
        return keras.Model(inputs, outputs, name="mixed")
    finally:
        keras.config.set_dtype_policy(policy)


def keras_spec(model):
    """The numpy_reference spec of a chain of Conv2D, BatchNormalization, ReLU, Flatten and Dense
    layers (such as mixed_float16_keras3's), from the model's float32 weights."""
    return [_keras_layer_spec(layer) for layer in model.layers[1:]]  # layers[0]: the InputLayer


def _keras_layer_spec(layer):
    kind = type(layer).__name__
    weights = [np.asarray(w, np.float64) for w in layer.get_weights()]
    if kind == "Conv2D":
        return {"type": "conv2d", "name": layer.name, "kernel": weights[0], "bias": weights[1],
                "strides": layer.strides, "padding": layer.padding, "activation": layer.activation.__name__}
    if kind == "Dense":
        return {"type": "dense", "name": layer.name, "kernel": weights[0], "bias": weights[1],
                "activation": layer.activation.__name__}
    if kind == "BatchNormalization":
        gamma, beta, mean, var = weights
        return {"type": "batchnorm", "name": layer.name, "gamma": gamma, "beta": beta, "mean": mean,
                "var": var, "epsilon": layer.epsilon}
    if kind == "ReLU" and layer.max_value in (None, 6) and not layer.negative_slope and not layer.threshold:
        return {"type": "relu" if layer.max_value is None else "relu6", "name": layer.name}
    if kind == "Flatten":
        return {"type": "flatten", "name": layer.name}
    raise ValueError(f"no spec for layer {layer.name} ({kind})")


# ---------------------------------------------------------------------------------------------
# Portable exports (gbp_rewrite.portable): models covering every op with a portable gradient


def portable_pools_keras3(keras, *, seed=0, batch_size=None):
    """AvgPool and an overlapping SAME max-pool concatenated, an unfolded BatchNorm (after a
    concatenation: broadcasting Mul/Sub/Add), a strided VALID conv, ReLU6, global average pool.
    `batch_size` fixes the batch dimension."""
    layers = keras.layers
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3), batch_size=batch_size, name="image")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
    a = layers.AveragePooling2D(2, name="avg")(x)
    m = layers.MaxPooling2D(3, strides=2, padding="same", name="maxpool")(x)
    x = layers.Concatenate(name="concat")([a, m])
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(max_value=6, name="bn_relu6")(x)
    x = layers.Conv2D(8, 3, strides=2, padding="valid", name="conv2")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(5, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs, name="pools")
    _spread_weights(model, seed)
    return model


def portable_separable_keras3(keras, *, seed=0):
    """A dilated separable conv, a strided depthwise conv with multiplier 2, BatchNorm folded into
    a conv, a residual Add, a 3x3/2 VALID max-pool, a squeeze-and-excitation style Mul, flatten."""
    layers = keras.layers
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((17, 17, 3), name="image")
    x = layers.SeparableConv2D(6, 3, dilation_rate=2, padding="same", activation="relu", name="sep")(inputs)
    x = layers.DepthwiseConv2D(3, strides=2, padding="valid", depth_multiplier=2, name="dw")(x)
    x = layers.Activation("relu6", name="dw_relu6")(x)
    r = layers.Conv2D(12, 1, name="pw")(x)
    r = layers.BatchNormalization(name="pw_bn")(r)
    r = layers.ReLU(name="pw_relu")(r)
    x = layers.Add(name="res_add")([x, r])
    gate = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    gate = layers.Dense(12, activation="sigmoid", name="se_gate")(gate)
    x = layers.Multiply(name="se_mul")([x, gate])
    x = layers.MaxPooling2D(3, strides=2, name="pool")(x)
    x = layers.Conv2D(4, 3, strides=2, padding="same", dilation_rate=1, activation="relu", name="conv_s2")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs, name="separable")
    _spread_weights(model, seed)
    return model


def uncovered_op_keras3(keras, *, seed=0):
    """A Cropping2D layer: a StridedSlice, whose gradient (StridedSliceGrad) has no portable form."""
    layers = keras.layers
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = layers.Cropping2D(1, name="crop")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="uncovered")
