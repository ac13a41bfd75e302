"""Each portable gradient against TensorFlow's own gradient of the same op (the reference), on small
random inputs over strides, paddings, dilations, overlapping pools and many ties; and the ReLU
rules against gates written here. Also: the portable gradients use no op outside the allow-list."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_close_relative
from gbp_rewrite.portable import export as portable_export
from gbp_rewrite.portable import gradients as pg

RTOL = 1e-6


@dataclasses.dataclass
class Case:
    """One op configuration: `fn`'s portable gradient (for `op_types`; ReLUs with the vanilla rule)
    against TensorFlow's own gradient of `reference` (default `fn`) at `x`."""

    name: str
    fn: Callable[[tf.Tensor], tf.Tensor]
    x: np.ndarray
    op_types: Sequence[str]
    reference: Callable[[tf.Tensor], tf.Tensor] | None = None

    def override(self) -> dict[str, str]:
        override = {t: pg.gradient_op_type(t) for t in self.op_types}
        override.update({t: pg.relu_gradient_op_type("vanilla", t) for t in ("Relu", "Relu6")})
        return override


def _gradients(fns, xs, overrides, *, dys=None, seed: int = 1):
    """d(sum(fn(x) * dy))/dx of each (fn, x) for a fixed random dy (or `dys`), with its override ({op type:
    gradient name}) active while `fn` builds its ops; the op types of the whole traced graph too.

    All cases are traced into one function and run once: a case costs its ops, not a trace."""
    rng = np.random.default_rng(seed)
    if dys is None:
        dys = [rng.normal(size=shape).astype(np.float32) for shape in _output_shapes(fns, xs)]

    @tf.function(autograph=False)
    def grad(*inputs):
        graph = tf.compat.v1.get_default_graph()
        results = []
        for fn, x, dy, override in zip(fns, inputs, dys, overrides):
            with graph.gradient_override_map(override):
                y = fn(x)
            results.append(tf.gradients(y, x, grad_ys=tf.constant(dy))[0])
        return results

    concrete = grad.get_concrete_function(*[tf.TensorSpec([None, *x.shape[1:]], tf.float32) for x in xs])
    op_types = {op.type for op in concrete.graph.get_operations()}
    return [g.numpy() for g in concrete(*[tf.constant(x) for x in xs])], op_types


def _output_shapes(fns, xs) -> list[tf.TensorShape]:
    """The shape of each fn(x), from one trace (some ops have no eager CPU kernel for every attr)."""

    @tf.function(autograph=False)
    def forward(*inputs):
        return [fn(x) for fn, x in zip(fns, inputs)]

    outputs = forward.get_concrete_function(*[tf.TensorSpec(x.shape, tf.float32) for x in xs]).structured_outputs
    return [output.shape for output in outputs]


def _check(cases: Sequence[Case]) -> None:
    """Every case's portable gradient within RTOL of TensorFlow's own; no op outside the allow-list."""
    pg.register()
    expected, _ = _gradients([c.reference or c.fn for c in cases], [c.x for c in cases], [{}] * len(cases))
    actual, used = _gradients([c.fn for c in cases], [c.x for c in cases], [c.override() for c in cases])
    failures = []
    for case, got, want in zip(cases, actual, expected):
        try:
            assert_close_relative(got, want, rtol=RTOL)
        except AssertionError as e:
            failures.append(f"{case.name}: {e}")
    assert not failures, "\n".join(failures)
    not_portable = used - portable_export.ALLOWED_OP_TYPES
    assert not not_portable, f"non-portable ops in the gradients: {sorted(not_portable)}"


def _images(shape, *, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _flat_colour_images(shape, *, seed=0):
    """Images of a few flat colours scaled by 1/255: nearly every pooling window is a tie."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 3, size=shape[:1] + (2, 2) + shape[3:])
    blocks = np.repeat(np.repeat(levels, -(-shape[1] // 2), axis=1), -(-shape[2] // 2), axis=2)
    return (blocks[:, : shape[1], : shape[2]] / 255.0).astype(np.float32)


POOLS = [  # (window, strides, padding)
    ((2, 2), (2, 2), "VALID"),
    ((2, 2), (2, 2), "SAME"),
    ((3, 3), (2, 2), "SAME"),  # overlapping (ResNet50, Xception)
    ((3, 3), (2, 2), "VALID"),  # overlapping (InceptionV3, DenseNet121)
    ((3, 3), (1, 1), "SAME"),  # InceptionV3's branch pools
    ((2, 3), (1, 2), "SAME"),  # unequal windows and strides
    ((1, 1), (2, 2), "VALID"),  # strides larger than the window
]


def _pool(pool, window, strides, padding, *, relu=False):
    if relu:
        return lambda t: pool(tf.nn.relu(t), window, strides, padding)
    return lambda t: pool(t, window, strides, padding)


@pytest.mark.parametrize("inputs", ["random", "flat colour ties", "relu zeros"])
def test_max_pool(inputs):
    shape = (2, 9, 10, 3)
    x = {"random": _images(shape), "flat colour ties": _flat_colour_images(shape),
         "relu zeros": _images(shape) - 1.0}[inputs]  # after a ReLU most windows hold several zeros
    cases = []
    for window, strides, padding in POOLS:
        if inputs != "random" and window != (1, 1):  # a 1x1 window cannot tie
            assert _tie_count(x, window, strides, padding, relu=inputs == "relu zeros") > 10
        cases.append(Case(f"{window} {strides} {padding}",
                          _pool(tf.nn.max_pool2d, window, strides, padding, relu=inputs == "relu zeros"),
                          x, ["MaxPool"]))
    _check(cases)


def _tie_count(x, window, strides, padding, *, relu):
    """How many (window, channel) pairs have their maximum more than once (so the test means something)."""
    x = np.maximum(x, 0) if relu else x
    del padding  # SAME would pad with zeros: count the windows fully inside (VALID)
    patches = tf.image.extract_patches(x, [1, *window, 1], [1, *strides, 1], [1, 1, 1, 1], "VALID").numpy()
    patches = patches.reshape(*patches.shape[:3], window[0] * window[1], x.shape[-1])
    return int(np.sum(np.sum(patches == patches.max(axis=3, keepdims=True), axis=3) > 1))


def test_avg_pool():
    x = _images((2, 9, 10, 3))
    _check([Case(f"{w} {s} {p}", _pool(tf.nn.avg_pool2d, w, s, p), x, ["AvgPool"]) for w, s, p in POOLS])


CONVS = [  # (kernel size, strides, padding, dilation)
    ((3, 3), 1, "SAME", 1),
    ((3, 3), 1, "VALID", 1),
    ((3, 3), 2, "SAME", 1),
    ((3, 3), 2, "VALID", 1),
    ((1, 1), 2, "VALID", 1),  # tf2onnx writes negative pads for this one with TF's own gradient
    ((1, 1), 1, "SAME", 1),
    ((5, 5), 2, "SAME", 1),
    ((7, 7), 2, "SAME", 1),
    ((2, 3), (1, 2), "SAME", 1),
    ((3, 3), 1, "SAME", 2),
    ((3, 3), 1, "VALID", 2),
    ((3, 2), 1, "SAME", 3),
]


def _conv_case(size, strides, padding, dilation) -> Case:
    kernel = tf.constant(_images((*size, 3, 4), seed=5))
    # TensorFlow's CPU Conv2DBackpropInput refuses dilations: the reference for a dilated
    # convolution is the same convolution written as space-to-batch around an undilated one.
    reference = None if dilation == 1 else (lambda t: tf.nn.atrous_conv2d(t, kernel, dilation, padding))
    return Case(f"{size} {strides} {padding} dilation {dilation}",
                lambda t: tf.nn.conv2d(t, kernel, strides, padding, dilations=dilation),
                _images((2, 11, 10, 3)), ["Conv2D"], reference=reference)


def test_conv2d():
    _check([_conv_case(*conv) for conv in CONVS])


def test_conv2d_with_a_variable_kernel():
    kernel = tf.Variable(_images((3, 3, 3, 4), seed=5))
    _check([Case("variable kernel", lambda t: tf.nn.conv2d(t, kernel, 2, "SAME"), _images((2, 8, 8, 3)), ["Conv2D"])])


def _depthwise_case(size, strides, padding, dilation, multiplier) -> Case:
    kernel = tf.constant(_images((*size, 3, multiplier), seed=6))
    return Case(f"{size} {strides} {padding} dilation {dilation} multiplier {multiplier}",
                lambda t: tf.nn.depthwise_conv2d(t, kernel, [1, *strides, 1], padding, dilations=(dilation, dilation)),
                _images((2, 11, 10, 3)), ["DepthwiseConv2dNative"])


def test_depthwise():
    # tf.nn.depthwise_conv2d (and so Keras) writes a dilated one as space-to-batch around an
    # undilated op; the dilations attr of the op itself is tested in test_depthwise_dilations_attr.
    # TensorFlow's depthwise convolution takes dilations with stride 1 only, and equal strides only.
    cases = []
    for size, strides, padding, dilation in CONVS:
        strides = strides if isinstance(strides, tuple) else (strides, strides)
        if (dilation != 1 and strides != (1, 1)) or strides[0] != strides[1]:
            continue
        cases.extend(_depthwise_case(size, strides, padding, dilation, multiplier) for multiplier in (1, 2))
    assert len(cases) == 22
    _check(cases)


def test_depthwise_dilations_attr():
    kernel = tf.constant(_images((3, 3, 3, 2), seed=6))

    def case(padding):
        op = lambda t: tf.raw_ops.DepthwiseConv2dNative(  # noqa: E731
            input=t, filter=kernel, strides=[1, 1, 1, 1], padding=padding, dilations=[1, 2, 2, 1])
        return Case(padding, op, _images((2, 11, 10, 3)), ["DepthwiseConv2dNative"],
                    reference=lambda t: tf.nn.depthwise_conv2d(t, kernel, [1, 1, 1, 1], padding, dilations=(2, 2)))

    _check([case("SAME"), case("VALID")])


def test_separable_conv_depthwise_part():
    depthwise = tf.constant(_images((3, 3, 3, 1), seed=7))
    pointwise = tf.constant(_images((1, 1, 3, 5), seed=8))
    _check([Case("separable", lambda t: tf.nn.separable_conv2d(t, depthwise, pointwise, [1, 2, 2, 1], "SAME"),
                 _images((2, 9, 9, 3)), ["DepthwiseConv2dNative", "Conv2D"])])


BROADCASTS = [  # (shape of the other operand, which operand is data)
    ((3,), "constant"),  # BatchNorm's unfolded form: x * inv + shift, per channel
    ((1, 1, 1, 3), "constant"),
    ((), "constant"),
    ((2, 5, 6, 3), "data"),  # a residual add
    ((2, 1, 1, 3), "data"),  # squeeze-and-excitation: x * gate
    ((2, 5, 1, 1), "data"),
]


def _elementwise_case(op_type, fn, other_shape, kind, order) -> Case:
    def model(t):
        if kind == "constant":
            other = tf.constant(_images(other_shape, seed=9))
        else:  # derived from the input too: both operands' gradients flow (and add up)
            axes = [a for a, d in enumerate(other_shape) if d == 1]
            other = tf.reduce_mean(t * 0.5, axis=axes, keepdims=True) if axes else t * 0.5
        a, b = (t * 1.5, other) if order == "x first" else (other, t * 1.5)
        return fn(a, b)

    return Case(f"{op_type} {other_shape} {kind} {order}", model, _images((2, 5, 6, 3)),
                [op_type, "Mean", "Mul"] if op_type != "Mul" else ["Mul", "Mean"])


@pytest.mark.parametrize("op_type,fn", [("AddV2", tf.add), ("Sub", tf.subtract), ("Mul", tf.multiply)])
def test_elementwise_broadcasting(op_type, fn):
    _check([_elementwise_case(op_type, fn, other_shape, kind, order)
            for other_shape, kind in BROADCASTS for order in ("x first", "x second")])


def test_bias_add_and_matmul():
    weights, bias = tf.constant(_images((12, 4), seed=10)), tf.constant(_images((4,), seed=11))
    _check([Case("bias_add", lambda t: tf.nn.bias_add(tf.matmul(t, weights), bias), _images((3, 12)),
                 ["BiasAdd", "MatMul"]),
            Case("transpose_b", lambda t: tf.matmul(t, tf.transpose(weights), transpose_b=True), _images((3, 12)),
                 ["MatMul"])])


def test_mean_and_sum():
    cases = []
    for keepdims in (False, True):
        for axes in ([1, 2], [1], [-1], [1, 2, 3]):
            cases.append(Case(f"mean {axes} {keepdims}", lambda t, a=axes, k=keepdims: tf.reduce_mean(t, axis=a, keepdims=k),
                              _images((2, 5, 6, 3)), ["Mean"]))
            cases.append(Case(f"sum {axes} {keepdims}", lambda t, a=axes, k=keepdims: tf.reduce_sum(t, axis=a, keepdims=k),
                              _images((2, 5, 6, 3)), ["Sum"]))
    _check(cases)


def test_concat():
    def model(axis):
        return lambda t: tf.concat([t * 2.0, tf.nn.relu(t), tf.reduce_mean(t, axis=axis, keepdims=True)], axis=axis)

    _check([Case(f"axis {axis}", model(axis), _images((2, 5, 6, 3)), ["ConcatV2", "Mul", "Mean"]) for axis in (-1, 1, 3)])


def test_reshape_squeeze_expand_dims():
    _check([Case("reshape", lambda t: tf.reshape(t, [-1, 90]) * 2.0, _images((2, 5, 6, 3)), ["Reshape"]),
            Case("squeeze", lambda t: tf.squeeze(t, [1, 2]) * 2.0, _images((2, 1, 1, 3)), ["Squeeze"]),
            Case("expand_dims", lambda t: tf.expand_dims(t, 1) * 2.0, _images((2, 5, 3)), ["ExpandDims"])])


def test_sigmoid_and_tanh():
    _check([Case(op_type, lambda t, f=fn: f(t * 2.0), _images((2, 5, 6, 3)), [op_type, "Mul"])
            for op_type, fn in (("Sigmoid", tf.sigmoid), ("Tanh", tf.tanh))])


def test_transpose_and_tensordot():
    weights = tf.constant(_images((3, 4), seed=12))  # a Dense layer on an image: Tensordot
    _check([Case("transpose", lambda t: tf.transpose(t, [0, 2, 3, 1]) * 2.0, _images((2, 5, 6, 3)), ["Transpose", "Mul"]),
            Case("tensordot", lambda t: tf.tensordot(t, weights, axes=[[3], [0]]), _images((2, 5, 6, 3)),
                 ["Transpose", "Reshape", "MatMul"])])


# ReLU rules: the gate written here, applied to TensorFlow's own true gradient where it applies.
def _gated(rule, op_type, dy, y):
    on = (y > 0) & (y < 6) if op_type == "Relu6" else y > 0
    if rule == "guided":
        return dy * on * (dy > 0)
    if rule == "deconvnet":
        return dy * (dy > 0)
    return dy * on


def test_relu_rules():
    pg.register()
    x = _images((2, 5, 6, 3)) * 5.0  # reaches past 6 for Relu6
    x[0, 0, 0, :] = [0.0, 6.0, -0.0]  # the kinks themselves
    dy = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    cases = [(rule, op_type, fn) for rule in ("guided", "deconvnet", "vanilla")
             for op_type, fn in (("Relu", tf.nn.relu), ("Relu6", tf.nn.relu6))]
    actual, used = _gradients([fn for _, _, fn in cases], [x] * len(cases),
                              [{op_type: pg.relu_gradient_op_type(rule, op_type)} for rule, op_type, _ in cases],
                              dys=[dy] * len(cases))
    assert not used - portable_export.ALLOWED_OP_TYPES
    true_gradients, _ = _gradients([fn for _, _, fn in cases], [x] * len(cases), [{}] * len(cases),
                                   dys=[dy] * len(cases))
    for (rule, op_type, fn), got, true in zip(cases, actual, true_gradients):
        np.testing.assert_array_equal(got, _gated(rule, op_type, dy, fn(x).numpy()), err_msg=f"{rule} {op_type}")
        if rule == "vanilla":  # the true gradient: TensorFlow's own
            np.testing.assert_array_equal(got, true, err_msg=op_type)


def test_a_kernel_computed_from_the_data_is_refused():
    pg.register()

    def model(t):
        kernel = tf.reshape(t[0, :3, :3, :], [3, 3, 3, 1])
        return tf.nn.conv2d(t, kernel, 1, "SAME")

    with pytest.raises(pg.PortableGradientError, match=r"Conv2D.*kernel computed from the data.*without --portable"):
        _gradients([model], [_images((2, 5, 5, 3))], [{"Conv2D": pg.gradient_op_type("Conv2D")}])


def test_dynamic_spatial_size_is_refused():
    pg.register()

    @tf.function
    def grad(x):
        with tf.compat.v1.get_default_graph().gradient_override_map({"MaxPool": pg.gradient_op_type("MaxPool")}):
            y = tf.nn.max_pool2d(x, 2, 2, "VALID")
        return tf.gradients(y, x)[0]

    with pytest.raises(pg.PortableGradientError, match=r"MaxPool.*dynamic shape"):
        grad.get_concrete_function(tf.TensorSpec([None, None, None, 3], tf.float32))
