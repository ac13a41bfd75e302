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
    return {"relu": tf.nn.relu, "relu6": tf.nn.relu6, "softmax": tf.nn.softmax, "sigmoid": tf.nn.sigmoid}[name](x)


def _apply(layers, x, weights, *, default_scopes=False):
    """Apply spec layers with tf ops; `weights(layer, key)` returns the tensor for a weight.

    An unnamed layer's scope is `<type>_<position>`, or with `default_scopes` its type, which
    TensorFlow uniquifies as TF1 code gets it (`dense`, `dense_1`, ...)."""
    for i, layer in enumerate(layers):
        kind = layer["type"]
        name = layer.get("name") or (kind if default_scopes else f"{kind}_{i}")
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
            elif kind == "sigmoid":
                x = tf.nn.sigmoid(x)
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


def spec_tf1(spec, input_shape, path: Path, *, default_scopes=False) -> Path:
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

        y = _apply(spec, x, weights, default_scopes=default_scopes)
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


def spec_keras_file(spec, input_shape, path: Path) -> Path:
    """The spec as a .keras file: converting it goes the Keras path."""
    path = path.with_suffix(".keras")
    ref.keras_model(spec, input_shape).save(str(path))
    return path


FAMILIES = {
    "keras3": spec_keras3,
    "keras_file": spec_keras_file,
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
    """The numpy_reference spec of a chain of Conv2D, BatchNormalization, ReLU, MaxPooling2D (valid),
    Flatten and Dense layers (such as mixed_float16_keras3's, or the shipped shapes_cnn), from the
    model's float32 weights."""
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
    if kind == "MaxPooling2D" and layer.padding == "valid":
        return {"type": "maxpool", "name": layer.name, "pool": tuple(layer.pool_size), "strides": tuple(layer.strides)}
    raise ValueError(f"no spec for layer {layer.name} ({kind})")


# ---------------------------------------------------------------------------------------------
# Default layer names (issue 11 item 1) and activations that use a ReLU op inside (item 2)


def default_names_spec(*, seed=11, features=6, num_classes=3):
    """Three Dense+relu layers and a Dense head, unnamed: Keras and TF1 call them dense, dense_1,
    dense_2, dense_3. `name_default_layers` gives the reference the same names."""
    rng = np.random.default_rng(seed)
    sizes = [features, 8, 8, 8]
    layers = [ref._random_dense(rng, None, sizes[i], sizes[i + 1], activation="relu") for i in range(3)]
    return layers + [ref._random_dense(rng, None, sizes[-1], num_classes)]


def name_default_layers(spec):
    """The spec with the names Keras and TF1 give its unnamed Dense layers: dense, dense_1, ..."""
    return [dict(layer, name="dense" if i == 0 else f"dense_{i}") for i, layer in enumerate(spec)]


def default_names_tf_keras(path: Path) -> Path:
    """A tf-keras Sequential of default-named layers (dense, dense_1, dense_2, dense_3)."""
    import tf_keras

    tf_keras.backend.clear_session()  # default names count from zero again
    spec = default_names_spec()
    model = tf_keras.Sequential([tf_keras.Input(shape=(spec[0]["kernel"].shape[0],), name="x")])
    for layer in spec:
        dense = tf_keras.layers.Dense(layer["kernel"].shape[1], activation=layer.get("activation"))
        model.add(dense)
        dense.set_weights([np.asarray(layer["kernel"], np.float32), np.asarray(layer["bias"], np.float32)])
    assert [l.name for l in model.layers] == [l["name"] for l in name_default_layers(spec)]
    model.save(str(path), save_format="tf")
    return path


def default_names_tf1(path: Path) -> Path:
    """A TF1 SavedModelBuilder graph whose scopes TensorFlow names dense, dense_1, ..."""
    spec = default_names_spec()
    return spec_tf1(spec, (spec[0]["kernel"].shape[0],), path, default_scopes=True)


def default_names_keras3(keras):
    """A Keras 3 Sequential whose layers carry Keras' default names dense, dense_1, ... (given
    explicitly: Keras 3 numbers default names across the session), so the call scopes Keras 3
    adds make dense_1 (layer dense) and dense_1_2 (layer dense_1)."""
    spec = name_default_layers(default_names_spec())
    model = keras.Sequential([keras.Input(shape=(spec[0]["kernel"].shape[0],), name="x")], name="sequential")
    for layer in spec:
        dense = keras.layers.Dense(layer["kernel"].shape[1], activation=layer.get("activation"), name=layer["name"])
        model.add(dense)
        dense.set_weights([np.asarray(layer["kernel"], np.float32), np.asarray(layer["bias"], np.float32)])
    return model


def nested_default_names_keras3(keras):
    """default_names_keras3 inside a functional model, after a layer named like its first one."""
    inner = default_names_keras3(keras)
    spec = name_default_layers(default_names_spec())
    inputs = keras.Input(shape=(spec[0]["kernel"].shape[0],), name="x")
    return keras.Model(inputs, inner(inputs), name="outer")


def hard_mix_spec(*, seed=5, input_shape=(8, 8, 3), num_classes=4):
    """hard_silu, relu, ReLU(max_value=3), hard_sigmoid, ReLU(threshold=0.5) and a softmax head,
    weights scaled so every activation sees both sides of each of its kinks."""
    rng = np.random.default_rng(seed)
    head = [
        ref._random_conv(rng, "conv_hs", input_shape[-1], 4, gain=2.0, activation="hard_silu"),
        ref._random_conv(rng, "conv_relu", 4, 4, strides=2, gain=2.0, activation="relu"),
        ref._random_conv(rng, "conv_cap", 4, 4, gain=3.0),
        {"type": "relu", "name": "cap3", "max_value": 3.0},
        {"type": "flatten", "name": "flatten"},
    ]
    features = int(np.prod(ref.output_shape(head, input_shape)))
    return head + [
        ref._random_dense(rng, "fc_hsig", features, 12, gain=3.0, activation="hard_sigmoid"),
        ref._random_dense(rng, "fc_thr", 12, 10, gain=3.0),
        {"type": "relu", "name": "thr", "threshold": 0.5},
        ref._random_dense(rng, "logits", 10, num_classes, activation="softmax"),
    ]


def hard_mix_keras3(keras):
    return ref.keras_model(hard_mix_spec(), (8, 8, 3), name="hard_mix")


def mobilenet_v3_gate_module(path: Path) -> Path:
    """MobileNetV3's hard_sigmoid and hard_swish as tf-keras writes them (ReLU(6.)(x + 3.) * (1/6),
    then x * that), a plain ReLU6 on x + 3 without the scaling, and a relu, as a TF2 module:
        score = sum(W2 . hard_swish(W1 x)) + sum(relu6(x + 3)) + sum(relu(x))
    The first Relu6 is part of hard_swish (kept), the second and the Relu are ReLU units."""

    class Gate(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(2)
            self.w1 = tf.Variable(rng.normal(0.0, 2.0, (4, 6)).astype(np.float32))
            self.w2 = tf.Variable(rng.normal(0.0, 1.0, (6, 2)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            with tf.name_scope("expand"):
                h = tf.matmul(x, self.w1)
            with tf.name_scope("hard_swish"):
                gate = tf.nn.relu6(h + 3.0) * (1.0 / 6.0)
                h = h * gate
            with tf.name_scope("shifted_relu6"):
                shifted = tf.nn.relu6(x + 3.0)
            with tf.name_scope("plain_relu"):
                plain = tf.nn.relu(x)
            extra = tf.reduce_sum(shifted, axis=1, keepdims=True) + tf.reduce_sum(plain, axis=1, keepdims=True)
            return {"scores": tf.matmul(h, self.w2) + extra}

    module = Gate()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


# ---------------------------------------------------------------------------------------------
# Output heads: a logits body (a numpy_reference spec without softmax) and what follows it


def _softmax_heads(z, head: str):
    """The spec's logits z [batch, K] through a softmax `head` (TensorFlow ops, graph path)."""
    k = int(z.shape[-1])
    if head == "reshape":
        return tf.reshape(tf.nn.softmax(z), [-1, k])
    if head == "squeeze":
        return tf.squeeze(tf.nn.softmax(tf.expand_dims(z, 1)), axis=1)
    if head == "expand_dims":
        return tf.reshape(tf.expand_dims(tf.nn.softmax(z), 1), [-1, k])
    if head == "identity":
        return tf.identity(tf.nn.softmax(z))
    if head == "cast":
        return tf.cast(tf.nn.softmax(z), tf.float64)
    if head == "concat":  # two softmax heads: classes [0, 2) and [2, K)
        return tf.concat([tf.nn.softmax(z[:, :2]), tf.nn.softmax(z[:, 2:])], axis=-1)
    if head == "scaled":  # a softmax inside arithmetic: no logit can be explained
        return tf.nn.softmax(z) * 2.0 + 1.0
    if head == "swish_dense":  # a sigmoid inside the network (swish) before a matrix product: logits
        return tf.matmul(z * tf.nn.sigmoid(z), tf.eye(k) * 0.5 + 0.1)
    raise ValueError(head)


HEADS = ("reshape", "squeeze", "expand_dims", "identity", "cast", "concat", "scaled", "swish_dense", "two_heads")


class _HeadModule(tf.Module):
    def __init__(self, spec, input_shape, head):
        super().__init__(name="head_module")
        self.body = _SpecModule(spec, input_shape)
        self.head = head
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name="image")])

    def _serve(self, image):
        z = self.body._serve(image)["scores"]
        if self.head == "two_heads":  # a softmax over classes [0, 3) and a binary sigmoid on unit 3
            return {"cls": tf.nn.softmax(z[:, :3]), "flag": tf.nn.sigmoid(z[:, 3:4])}
        return {"scores": _softmax_heads(z, self.head)}


def head_module(spec, input_shape, head: str, path: Path) -> Path:
    """A TF2 SavedModel: the logits of `spec` through `head` (one of HEADS)."""
    module = _HeadModule(spec, input_shape, head)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def smooth_activations_keras3(keras):
    """One Dense per activation that has no guided rule, in the lowered forms Keras 3 writes:
    GELU exact (Erfc) and tanh-approximated, swish, mish, ELU, SELU, softplus, sigmoid, tanh,
    and one relu so the model converts."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,), name="x")
    x = inputs
    activations = {
        "gelu": "gelu", "gelu_tanh": lambda t: keras.activations.gelu(t, approximate=True),
        "swish": "swish", "mish": "mish", "elu": "elu", "selu": "selu", "softplus": "softplus",
        "sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu",
    }
    for name, activation in activations.items():
        x = keras.layers.Dense(4, activation=activation, name=f"d_{name}")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x), name="smooth")
KERAS_HEADS = ("reshape", "squeeze", "identity", "concat", "scaled", "two_heads")


def head_keras3(keras, spec, input_shape, head: str):
    """A Keras 3 model: the logits of `spec` through `head` (one of KERAS_HEADS), with layers."""
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    z = ref._keras_layers(keras, spec, inputs)
    k = int(z.shape[-1])
    layers = keras.layers
    if head == "reshape":
        outputs = layers.Reshape((k,), name="reshape_head")(layers.Softmax(name="probs")(z))
    elif head == "squeeze":
        expanded = layers.Reshape((1, k), name="expand")(z)
        outputs = layers.Lambda(lambda t: keras.ops.squeeze(t, axis=1), name="squeeze")(
            layers.Softmax(name="probs")(expanded))
    elif head == "identity":
        outputs = layers.Identity(name="same")(layers.Activation("softmax", name="probs")(z))
    elif head == "concat":
        first = layers.Softmax(name="probs_a")(layers.Lambda(lambda t: t[:, :2], name="take_a")(z))
        second = layers.Softmax(name="probs_b")(layers.Lambda(lambda t: t[:, 2:], name="take_b")(z))
        outputs = layers.Concatenate(name="heads")([first, second])
    elif head == "scaled":
        outputs = layers.Rescaling(2.0, offset=1.0, name="scale")(layers.Softmax(name="probs")(z))
    elif head == "two_heads":
        cls = layers.Softmax(name="cls")(layers.Lambda(lambda t: t[:, :3], name="take_cls")(z))
        flag = layers.Activation("sigmoid", name="flag")(layers.Lambda(lambda t: t[:, 3:4], name="take_flag")(z))
        outputs = {"cls": cls, "flag": flag}
    else:
        raise ValueError(head)
    return keras.Model(inputs, outputs, name=f"head_{head}")
# Models whose ReLUs are not all between the explained input and output (issue 11 item 5)


def _random_weights(model, seed):
    """Normal weights (kernels scaled by 1/sqrt(fan-in)) and biases, so ReLUs cut both ways."""
    rng = np.random.default_rng(seed)
    for layer in _leaf_layers(model):
        weights = layer.get_weights()
        if weights:
            kernel, bias = weights
            layer.set_weights([rng.normal(0, 1.5 / np.sqrt(kernel.shape[0]), kernel.shape).astype(np.float32),
                               rng.normal(0, 0.5, bias.shape).astype(np.float32)])


def two_head_keras3(keras, *, input_shape, seed=0):
    """Two heads on one flattened input: head `a` = softmax(a_logits(trunk) + a_frozen(stop_gradient(
    frozen))), head `b` = b(b_hidden). ReLUs: trunk (on a's path), frozen (behind stop_gradient),
    b_hidden (on b's path only)."""
    layers = keras.layers
    inputs = keras.Input(input_shape, name="x")
    flat = layers.Flatten(name="flatten")(inputs)
    trunk = layers.Dense(6, activation="relu", name="trunk")(flat)
    frozen = layers.Dense(3, activation="relu", name="frozen")(flat)
    logits = layers.Add(name="a_sum")([
        layers.Dense(3, name="a_logits")(trunk),
        layers.Dense(3, name="a_frozen")(keras.ops.stop_gradient(frozen)),
    ])
    a = layers.Softmax(name="a")(logits)
    b = layers.Dense(2, name="b")(layers.Dense(4, activation="relu", name="b_hidden")(flat))
    model = keras.Model(inputs, {"a": a, "b": b}, name="two_heads")
    _random_weights(model, seed)
    return model


def other_head_relu_keras3(keras, *, input_shape, seed=0):
    """Head `a` is linear (no ReLU); the only ReLU is in head `b`."""
    layers = keras.layers
    inputs = keras.Input(input_shape, name="x")
    flat = layers.Flatten(name="flatten")(inputs)
    a = layers.Dense(3, name="a")(flat)
    b = layers.Dense(2, name="b")(layers.Dense(4, activation="relu", name="b_hidden")(flat))
    model = keras.Model(inputs, {"a": a, "b": b}, name="other_head")
    _random_weights(model, seed)
    return model


def relu_in_call_keras3(keras, *, input_shape, seed=0):
    """A custom layer that applies a ReLU in its own call() and then its `activation` (relu):
    flatten -> pre (dense) -> custom: activation(relu(x) @ kernel + bias) -> logits."""

    class ReluThenDense(keras.layers.Layer):
        def __init__(self, units, activation=None, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.activation = keras.activations.get(activation)

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
            self.bias = self.add_weight(shape=(self.units,), name="bias", initializer="zeros")

        def call(self, x):
            return self.activation(keras.ops.matmul(keras.ops.relu(x), self.kernel) + self.bias)

        def get_config(self):
            return {**super().get_config(), "units": self.units,
                    "activation": keras.activations.serialize(self.activation)}

    layers = keras.layers
    inputs = keras.Input(input_shape, name="x")
    x = layers.Flatten(name="flatten")(inputs)
    x = layers.Dense(6, name="pre")(x)
    x = ReluThenDense(5, activation="relu", name="custom")(x)
    outputs = layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs, name="relu_in_call")
    _random_weights(model, seed)
    return model


def dense_spec(layer, *, activation=None, name=None):
    """A numpy_reference dense layer with a Keras layer's weights (float64)."""
    kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
    return {"type": "dense", "name": name or layer.name, "kernel": kernel, "bias": bias, "activation": activation}


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


# ---------------------------------------------------------------------------------------------
# Smooth activations under the guided extension (issue 13 item 3): models without a ReLU, built
# from numpy_reference specs so the reference computes their maps.

SMOOTH_INPUT_SHAPE = (8, 8, 3)


def efficientnet_style_keras3(keras, *, relu_head: bool = False):
    """EfficientNet's pieces, small (ref.efficientnet_style_spec): conv + swish, a
    squeeze-and-excitation block (swish, a sigmoid gate multiplied in), 1x1 projection, gap, dense
    softmax. `relu_head`: the projection has a ReLU (the plain guided rule has something to rewrite)."""
    spec = ref.efficientnet_style_spec(input_shape=SMOOTH_INPUT_SHAPE, relu_head=relu_head)
    return ref.keras_model(spec, SMOOTH_INPUT_SHAPE, name="effnet_relu" if relu_head else "effnet_style")


def convnext_style_keras3(keras):
    """ConvNeXt's pieces, small (ref.convnext_style_spec): patchify conv, a residual block of conv,
    LayerNorm, pointwise dense + GELU, pointwise dense; gap, LayerNorm, dense logits."""
    del keras  # ref.keras_model imports it
    return ref.keras_model(ref.convnext_style_spec(input_shape=SMOOTH_INPUT_SHAPE), SMOOTH_INPUT_SHAPE,
                           name="convnext_style")


def smooth_chain_keras3(keras):
    """ref.smooth_chain_spec as a Keras model: one Dense per smooth activation (the tanh-form GELU
    through a lambda, which only the SavedModel path can rewrite), a binary sigmoid head."""
    del keras
    return ref.keras_model(ref.smooth_chain_spec(input_shape=SMOOTH_INPUT_SHAPE), SMOOTH_INPUT_SHAPE,
                           name="smooth_chain")


def conv_bn_swish_keras3(keras):
    """ref.conv_bn_swish_spec as a Keras model: conv, BatchNorm, Activation('swish'), gap, dense."""
    del keras
    return ref.keras_model(ref.conv_bn_swish_spec(input_shape=SMOOTH_INPUT_SHAPE), SMOOTH_INPUT_SHAPE,
                           name="conv_bn_swish")
