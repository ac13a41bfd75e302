"""Portable gradients: the backward pass built only from forward ops that TFLite builtins and ONNX
both have (no ReluGrad, MaxPoolGrad, BroadcastGradientArgs, ...).

Each function here is registered under a `_gradient_op_type` name (`gradient_op_type(op_type)`;
ReLUs per rule, `relu_gradient_op_type(rule, op_type)`) exactly like gbp_rewrite.rules, and gives
TensorFlow's own numbers for the input gradient:

    Relu/Relu6     the rule's gate as compare -> cast -> multiply
    Conv2D         conv2d_transpose to the rows/columns the windows cover, then an explicit
                   slice/pad to the input (dilated: a correlation with the flipped kernel)
    Depthwise      a depthwise convolution with the flipped kernel over the zero-dilated, padded dy
    AvgPool        the same, with a kernel of ones and dy divided by each window's count
    MaxPool        per window offset, a mask "this element is the window's max and no earlier one
                   was" (TF gives a tied window's gradient to its first maximum in row-major order),
                   times dy, zero-dilated and summed (overlapping pools included)
    Add/Sub/Mul    dy (times the other operand) summed over the broadcast axes of static shapes
    Mean/Sum       dy reshaped with the reduced axes kept, times ones (Mean: divided by the count)
    ConcatV2       a split with the static sizes
    BiasAdd        dy
    Reshape etc.   a reshape to the static shape
    Sigmoid/Tanh   dy * y * (1 - y), dy * (1 - y * y)
    Transpose      the inverse permutation, computed here (no InvertPermutation op)

Kernels (Conv2D, depthwise, MatMul) are taken in the layout TFLite stores for the forward op and
made data-dependent by an exact zero (`_unfolded`) before being re-laid out, so the converters keep
one copy of each kernel instead of folding a transposed or flipped second one into the file.

Gradients are built for data inputs only: an input computed from variables and constants alone (a
kernel, a bias, BatchNorm's scale) gets none, which is all the explainable signature needs (it
differentiates with respect to the model's inputs). A kernel that depends on the data is refused.
Spatial sizes must be static (they are in image models); the batch may be dynamic.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import numpy as np
import tensorflow as tf

from gbp_rewrite import rules, tf_internals
from gbp_rewrite.errors import SourceModelError

PREFIX = "GbpPortable_"


class PortableGradientError(SourceModelError):
    """An op has no portable gradient (or not for this configuration)."""


def gradient_op_type(op_type: str) -> str:
    """The `_gradient_op_type` value selecting the portable gradient of `op_type`."""
    return f"{PREFIX}{op_type}"


def relu_gradient_op_type(rule_name: str, op_type: str) -> str:
    """The `_gradient_op_type` value selecting `rule_name`'s portable gradient for Relu/Relu6."""
    return f"{PREFIX}{op_type}_{rule_name}"


# ---------------------------------------------------------------------------------------------
# Which inputs need a gradient

# Ops through which a tensor computed only from variables and constants stays a "weight".
_WEIGHT_SOURCES = frozenset({"Const", "ReadVariableOp", "VarHandleOp", "VariableV2"})


def is_weight(tensor: tf.Tensor) -> bool:
    """True when `tensor` is computed from variables and constants alone (no data input)."""
    stack, seen = [tensor.op], set()
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if op.type in _WEIGHT_SOURCES:
            continue
        if op.type == "Placeholder":
            if op.outputs[0].dtype == tf.resource or _captures_a_constant(op):
                continue  # a captured variable handle or eager constant
            return False
        if not op.inputs:
            return False  # a source we do not know (e.g. a random op): treat as data
        stack.extend(t.op for t in op.inputs)
    return True


def _captures_a_constant(placeholder) -> bool:
    captured = {id(internal): external for external, internal in getattr(placeholder.graph, "captures", ())}
    return hasattr(captured.get(id(placeholder.outputs[0])), "numpy")  # an eager tensor: a value


def _needs(tensor: tf.Tensor) -> bool:
    return tensor.dtype.is_floating and not is_weight(tensor)


def _refuse(op, what: str) -> PortableGradientError:
    return PortableGradientError(
        f"op '{op.name}' ({op.type}) has no portable gradient {what}; convert without --portable "
        "(the regular export runs in TensorFlow and TF Serving)"
    )


# ---------------------------------------------------------------------------------------------
# Static shape helpers


def _static(op, tensor: tf.Tensor, axes) -> list[int]:
    shape = tensor.shape
    if shape.rank is None or any(shape[a] is None for a in axes):
        raise _refuse(op, f"for the dynamic shape {shape} of '{tensor.name}' (needs static sizes)")
    return [int(shape[a]) for a in axes]


def _same_pads(size: int, window: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) for one spatial dimension."""
    effective = (window - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _pads(op, padding: str, size: int, window: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    if padding == "VALID":
        return 0, 0
    if padding == "SAME":
        return _same_pads(size, window, stride, dilation)
    raise _refuse(op, f"for padding {padding!r} (valid: SAME, VALID)")


def _check_nhwc(op) -> None:
    try:
        data_format = op.get_attr("data_format").decode()
    except ValueError:
        return
    if data_format != "NHWC":
        raise _refuse(op, f"for data_format {data_format!r} (valid: NHWC)")


def _fit(covered: tf.Tensor, *, start: tuple[int, int], size: tuple[int, int]) -> tf.Tensor:
    """Rows/columns [start, start + size) of `covered` ([N, h, w, C]), zeros beyond its end:
    the input's gradient from the gradient of the padded input's covered part."""
    h, w = int(covered.shape[1]), int(covered.shape[2])
    end = (min(h, start[0] + size[0]), min(w, start[1] + size[1]))
    if start != (0, 0) or end != (h, w):
        covered = covered[:, start[0]:end[0], start[1]:end[1], :]
    extra = (start[0] + size[0] - end[0], start[1] + size[1] - end[1])
    if extra != (0, 0):
        covered = tf.pad(covered, [[0, 0], [0, extra[0]], [0, extra[1]], [0, 0]])
    return covered


def _zero_dilate(x: tf.Tensor, stride: tuple[int, int]) -> tf.Tensor:
    """[N, h, w, C] -> [N, (h-1)*sh+1, (w-1)*sw+1, C] with sh-1 / sw-1 zeros between elements
    (4-D reshapes and pads only: TFLite's PAD takes at most 5 dimensions)."""
    sh, sw = stride
    _, h, w, c = (int(d) if d is not None else -1 for d in x.shape)
    if sh > 1:
        x = tf.reshape(x, [-1, h, 1, w * c])
        x = tf.pad(x, [[0, 0], [0, 0], [0, sh - 1], [0, 0]])
        x = tf.reshape(x, [-1, h * sh, w, c])[:, : (h - 1) * sh + 1]
        h = (h - 1) * sh + 1
    if sw > 1:
        x = tf.reshape(x, [-1, w, 1, c])
        x = tf.pad(x, [[0, 0], [0, 0], [0, sw - 1], [0, 0]])
        x = tf.reshape(x, [-1, h, w * sw, c])[:, :, : (w - 1) * sw + 1]
    return x


def _window_attrs(op) -> tuple[tuple[int, int], tuple[int, int], str]:
    ksize, strides = op.get_attr("ksize"), op.get_attr("strides")
    if ksize[0] != 1 or ksize[3] != 1 or strides[0] != 1 or strides[3] != 1:
        raise _refuse(op, f"for windows over batch or channels (ksize {ksize}, strides {strides})")
    return (ksize[1], ksize[2]), (strides[1], strides[2]), op.get_attr("padding").decode()


# ---------------------------------------------------------------------------------------------
# ReLU family: the rules' gates from compare, cast and multiply


def _on(y: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.greater(y, tf.zeros([], y.dtype)), y.dtype)


def _on6(y: tf.Tensor) -> tf.Tensor:
    inside = tf.logical_and(tf.greater(y, tf.zeros([], y.dtype)), tf.less(y, tf.constant(6, y.dtype)))
    return tf.cast(inside, y.dtype)


def _guided_relu(dy, y):
    return tf.nn.relu(dy) * _on(y)


def _guided_relu6(dy, y):
    return tf.nn.relu(dy) * _on6(y)


def _deconvnet(dy, y):
    del y  # the deconvnet rule ignores the forward pass
    return tf.nn.relu(dy)


def _vanilla_relu(dy, y):
    return dy * _on(y)


def _vanilla_relu6(dy, y):
    return dy * _on6(y)


RELU_RULES: dict[str, dict[str, Callable]] = {
    "guided": {"Relu": _guided_relu, "Relu6": _guided_relu6},
    "deconvnet": {"Relu": _deconvnet, "Relu6": _deconvnet},
    "vanilla": {"Relu": _vanilla_relu, "Relu6": _vanilla_relu6},
}


# ---------------------------------------------------------------------------------------------
# Convolutions and pools


def _conv_setup(op):
    """(x, kernel, stride, dilation, padding) of a Conv2D/depthwise op, or None when x needs no
    gradient; refused for NCHW, a kernel computed from the data and explicit paddings."""
    x, kernel = op.inputs
    _check_nhwc(op)
    if not is_weight(kernel):
        raise _refuse(op, "for a kernel computed from the data")
    if not _needs(x):
        return None
    strides, dilations = op.get_attr("strides"), op.get_attr("dilations")
    padding = op.get_attr("padding").decode()
    if padding == "EXPLICIT":
        raise _refuse(op, "for explicit paddings")
    return x, kernel, (strides[1], strides[2]), (dilations[1], dilations[2]), padding


def _zero_from(dy: tf.Tensor) -> tf.Tensor:
    """A float zero the converters cannot fold: `m < m` is false for every m, NaN included, and
    m (the max of dy's first element, -inf for an empty dy) is known only at run time."""
    m = tf.reduce_max(dy[tuple(slice(0, 1) for _ in range(dy.shape.rank))])
    return tf.cast(tf.less(m, m), dy.dtype)


def _unfolded(stored: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """`stored` plus a zero computed from `dy`: the same values, but no longer a constant.

    The converters fold every op whose inputs are all constants, so a kernel re-laid out for the
    backward op (transposed, flipped) would be stored a second time. Written from the layout the
    forward op stores (`stored`, which the converter folds into that same constant) and made
    data-dependent here, the re-layout runs at run time and the file keeps one copy.
    """
    return stored + tf.cast(_zero_from(dy), stored.dtype)


def _conv2d(op, dy):
    setup = _conv_setup(op)
    if setup is None:
        return None, None
    x, kernel, stride, dilation, padding = setup
    h, w, _ = _static(op, x, (1, 2, 3))
    kh, kw = _static(op, kernel, (0, 1))
    oh, ow = _static(op, dy, (1, 2))
    pads = (_pads(op, padding, h, kh, stride[0], dilation[0]), _pads(op, padding, w, kw, stride[1], dilation[1]))
    covered = ((oh - 1) * stride[0] + (kh - 1) * dilation[0] + 1, (ow - 1) * stride[1] + (kw - 1) * dilation[1] + 1)
    # [out, kh, kw, in]: the layout TFLite's CONV_2D stores for the forward op.
    live = _unfolded(tf.transpose(kernel, [3, 0, 1, 2]), dy)
    if dilation == (1, 1):
        shape = tf.stack([tf.shape(dy)[0], covered[0], covered[1], int(x.shape[3])])
        dx = tf.nn.conv2d_transpose(dy, tf.transpose(live, [1, 2, 3, 0]), shape, strides=[1, *stride, 1],
                                    padding="VALID")
    else:  # TF's convolutions take dilations with stride 1 only: a full correlation, flipped kernel
        flipped = tf.transpose(tf.reverse(live, [1, 2]), [1, 2, 0, 3])  # [kh, kw, out, in]
        dx = _full_correlation(dy, flipped, window=(kh, kw), stride=stride, dilation=dilation, depthwise=False)
    return _fit(dx, start=(pads[0][0], pads[1][0]), size=(h, w)), None


def _full_correlation(dy, kernel, *, window, stride, dilation, depthwise: bool):
    """The covered part of a convolution's input gradient: the zero-dilated dy, padded by the
    dilated window minus one on each side, correlated with the (already flipped) kernel."""
    g = _zero_dilate(dy, stride)
    ph, pw = (window[0] - 1) * dilation[0], (window[1] - 1) * dilation[1]
    g = tf.pad(g, [[0, 0], [ph, ph], [pw, pw], [0, 0]])
    if depthwise:
        return tf.nn.depthwise_conv2d(g, kernel, [1, 1, 1, 1], "VALID", dilations=list(dilation))
    return tf.nn.conv2d(g, kernel, 1, "VALID", dilations=[1, *dilation, 1])


def _depthwise(op, dy):
    setup = _conv_setup(op)
    if setup is None:
        return None, None
    x, kernel, stride, dilation, padding = setup
    h, w, c = _static(op, x, (1, 2, 3))
    kh, kw, _, multiplier = _static(op, kernel, (0, 1, 2, 3))
    pads = (_pads(op, padding, h, kh, stride[0], dilation[0]), _pads(op, padding, w, kw, stride[1], dilation[1]))
    # Output channel c*M+m comes from input channel c: correlate each of the C*M channels with its
    # own flipped kernel, then sum the M channels of each input channel. [1, kh, kw, C*M] is the
    # layout TFLite's DEPTHWISE_CONV_2D stores for the forward op.
    live = _unfolded(tf.reshape(kernel, [1, kh, kw, c * multiplier]), dy)
    flipped = tf.reshape(tf.reverse(live, [1, 2]), [kh, kw, c * multiplier, 1])
    dx = _full_correlation(dy, flipped, window=(kh, kw), stride=stride, dilation=dilation, depthwise=True)
    if multiplier > 1:
        dx = tf.reduce_sum(tf.reshape(dx, [-1, int(dx.shape[1]), int(dx.shape[2]), c, multiplier]), axis=-1)
    return _fit(dx, start=(pads[0][0], pads[1][0]), size=(h, w)), None


def _pool_setup(op, dy):
    """What both pooling gradients need: the input x, window, stride, the input's (h, w, c), the
    output's (oh, ow) and the padding before/after on each spatial axis (static shapes, NHWC)."""
    (x,) = op.inputs
    _check_nhwc(op)
    window, stride, padding = _window_attrs(op)
    h, w, c = _static(op, x, (1, 2, 3))
    oh, ow = _static(op, dy, (1, 2))
    pads = (_pads(op, padding, h, window[0], stride[0]), _pads(op, padding, w, window[1], stride[1]))
    return x, window, stride, (h, w, c), (oh, ow), pads


def _avg_pool(op, dy):
    _, window, stride, (h, w, c), (oh, ow), pads = _pool_setup(op, dy)
    # Each output's value is its window's mean over the elements inside the input (SAME padding
    # leaves the padded ones out of the count).
    count = (_window_counts(h, window[0], stride[0], pads[0][0], oh)[:, None]
             * _window_counts(w, window[1], stride[1], pads[1][0], ow)[None, :])
    scaled = dy / tf.constant(count[None, :, :, None], dy.dtype)
    ones = tf.ones([window[0], window[1], c, 1], dy.dtype)
    dx = _full_correlation(scaled, ones, window=window, stride=stride, dilation=(1, 1), depthwise=True)
    return _fit(dx, start=(pads[0][0], pads[1][0]), size=(h, w))


def _window_counts(size: int, window: int, stride: int, before: int, out: int) -> np.ndarray:
    starts = np.arange(out) * stride - before
    return (np.minimum(starts + window, size) - np.maximum(starts, 0)).astype(np.float64)


def _max_pool(op, dy):
    x, window, stride, (h, w, _), (oh, ow), pads = _pool_setup(op, dy)
    pooled = op.outputs[0]
    # Padding never wins: the lowest float is below every real element of a window.
    lowest = tf.constant(x.dtype.min, x.dtype)
    padded = tf.pad(x, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]], constant_values=lowest)
    taken = None
    pieces = {}
    for i in range(window[0]):  # row-major order: TensorFlow's first maximum of a window wins
        for j in range(window[1]):
            element = padded[:, i:i + (oh - 1) * stride[0] + 1:stride[0], j:j + (ow - 1) * stride[1] + 1:stride[1], :]
            hit = tf.cast(tf.equal(element, pooled), dy.dtype)
            first = hit if taken is None else hit * (1 - taken)
            taken = first if taken is None else taken + first
            pieces[i, j] = dy * first
    covered = _scatter_windows(pieces, window=window, stride=stride)
    return _fit(covered, start=(pads[0][0], pads[1][0]), size=(h, w))


def _scatter_windows(pieces: dict[tuple[int, int], tf.Tensor], *, window, stride) -> tf.Tensor:
    """Sum piece (i, j) ([N, OH, OW, C]) into the padded input at rows i + o*sh, columns j + o*sw.

    Offsets with the same remainder modulo the stride land on the same sub-grid: they are summed at
    the pooled resolution (shifted by whole output steps), then the sub-grids are interleaved with
    depth_to_space (the channel blocks in (row remainder, column remainder) order).
    """
    (kh, kw), (sh, sw) = window, stride
    qh, qw = -(-kh // sh), -(-kw // sw)
    grids = {}
    for (i, j), piece in pieces.items():
        (a, ri), (b, rj) = divmod(i, sh), divmod(j, sw)
        shifted = tf.pad(piece, [[0, 0], [a, qh - 1 - a], [b, qw - 1 - b], [0, 0]]) if (qh, qw) != (1, 1) else piece
        grids[ri, rj] = shifted if (ri, rj) not in grids else grids[ri, rj] + shifted
    if (sh, sw) == (1, 1):
        return grids[0, 0]
    zeros = tf.zeros_like(next(iter(grids.values())))
    if sh == sw:
        blocks = [grids.get((ri, rj), zeros) for ri in range(sh) for rj in range(sw)]
        return tf.nn.depth_to_space(tf.concat(blocks, axis=-1), sh)
    # Unequal strides: interleave rows, then columns, by stacking and reshaping.
    rows = [tf.stack([grids.get((ri, rj), zeros) for rj in range(sw)], axis=3) for ri in range(sh)]
    n_h, n_w, c = (int(d) for d in zeros.shape[1:])
    stacked = tf.stack(rows, axis=2)  # [N, h, sh, w, sw, C]
    return tf.reshape(stacked, [-1, n_h * sh, n_w * sw, c])


# ---------------------------------------------------------------------------------------------
# Elementwise with broadcasting, reductions, concatenation, reshapes


def _unbroadcast(op, grad: tf.Tensor, target: tf.Tensor, other: tf.Tensor) -> tf.Tensor:
    """`grad` (the broadcast result's shape) summed down to `target`'s static shape."""
    g_shape, t_shape, o_shape = grad.shape, target.shape, other.shape
    if t_shape.rank is None or g_shape.rank is None or o_shape.rank is None:
        raise _refuse(op, "for operands of unknown rank")
    lead = g_shape.rank - t_shape.rank
    axes = list(range(lead))
    for axis in range(t_shape.rank):
        t_dim, g_dim = t_shape[axis], g_shape[lead + axis]
        o_axis = axis + lead - (g_shape.rank - o_shape.rank)
        o_dim = o_shape[o_axis] if o_axis >= 0 else 1
        if t_dim == 1 and g_dim != 1:
            axes.append(lead + axis)
        elif t_dim is None and o_dim not in (None, 1):
            raise _refuse(op, f"for broadcasting a dynamic dimension against {o_dim} ('{target.name}')")
    if not axes:
        return grad
    summed = tf.reduce_sum(grad, axis=axes, keepdims=True)
    if lead:
        summed = tf.reshape(summed, [-1 if d is None else d for d in t_shape]) if t_shape.rank else tf.reshape(summed, [])
    return summed


def _add(op, dy):
    a, b = op.inputs
    return (_unbroadcast(op, dy, a, b) if _needs(a) else None,
            _unbroadcast(op, dy, b, a) if _needs(b) else None)


def _sub(op, dy):
    a, b = op.inputs
    return (_unbroadcast(op, dy, a, b) if _needs(a) else None,
            _unbroadcast(op, -dy, b, a) if _needs(b) else None)


def _mul(op, dy):
    a, b = op.inputs
    return (_unbroadcast(op, dy * b, a, b) if _needs(a) else None,
            _unbroadcast(op, dy * a, b, a) if _needs(b) else None)


def _bias_add(op, dy):
    x, bias = op.inputs
    _check_nhwc(op)
    if not is_weight(bias):
        raise _refuse(op, "for a bias computed from the data")
    return dy, None


def _reduction(op, dy, *, mean: bool):
    x, axes = op.inputs
    rank = x.shape.rank
    axes_value = tf.get_static_value(axes)
    if rank is None or axes_value is None:
        raise _refuse(op, "for a reduction over axes or a rank that is not static")
    reduced = sorted({int(a) % rank for a in np.atleast_1d(axes_value)})
    sizes = _static(op, x, reduced)
    if not op.get_attr("keep_dims"):
        keep = [1 if a in reduced else (-1 if x.shape[a] is None else int(x.shape[a])) for a in range(rank)]
        if keep.count(-1) > 1:
            raise _refuse(op, f"for the shape {x.shape} (more than one dynamic dimension)")
        dy = tf.reshape(dy, keep)
    if mean:
        dy = dy / tf.constant(math.prod(sizes), dy.dtype)
    ones = np.ones([int(x.shape[a]) if a in reduced else 1 for a in range(rank)])
    return dy * tf.constant(ones, dy.dtype), None


def _mean(op, dy):
    return _reduction(op, dy, mean=True)


def _sum(op, dy):
    return _reduction(op, dy, mean=False)


def _concat(op, dy):
    *values, axis = op.inputs
    axis_value = tf.get_static_value(axis)
    rank = values[0].shape.rank
    if axis_value is None or rank is None:
        raise _refuse(op, "for a concatenation axis or rank that is not static")
    axis_value = int(axis_value) % rank
    sizes = [_static(op, v, [axis_value])[0] for v in values]
    parts = tf.split(dy, sizes, axis=axis_value)
    return [p if _needs(v) else None for p, v in zip(parts, values)] + [None]


def _reshape_back(op, dy):
    x = op.inputs[0]
    shape = [-1 if d is None else int(d) for d in x.shape] if x.shape.rank is not None else None
    if shape is None or shape.count(-1) > 1:
        raise _refuse(op, f"for the input shape {x.shape} (more than one dynamic dimension)")
    return [tf.reshape(dy, shape)] + [None] * (len(op.inputs) - 1)


def _matmul(op, dy):
    a, b = op.inputs
    ta, tb = op.get_attr("transpose_a"), op.get_attr("transpose_b")
    if ta:
        raise _refuse(op, "for transpose_a")
    grad_a = None
    if _needs(a):  # dy @ b^T from [out, in], the layout TFLite's FULLY_CONNECTED stores
        live = _unfolded(b if tb else tf.transpose(b), dy)
        # + 0: TFLite's converter fuses a ReLU that follows into the BATCH_MATMUL it makes of this
        # and drops it (BATCH_MATMUL has no activation); ADD takes the ReLU and keeps it.
        grad_a = tf.matmul(dy, live) + _zero_from(dy)
    grad_b = None
    if _needs(b):
        grad_b = tf.matmul(a, dy, transpose_a=True)
        grad_b = tf.transpose(grad_b) if tb else grad_b
    return grad_a, grad_b


def _sigmoid(op, dy):
    y = op.outputs[0]
    return dy * (y * (1 - y))


def _tanh(op, dy):
    y = op.outputs[0]
    return dy * (1 - y * y)


def _transpose(op, dy):
    perm = tf.get_static_value(op.inputs[1])
    if perm is None:
        raise _refuse(op, "for a permutation that is not static")
    return tf.transpose(dy, np.argsort(perm)), None


# Op type -> portable gradient. ReLUs are registered per rule (RELU_RULES).
GRADIENTS: dict[str, Callable] = {
    "Conv2D": _conv2d,
    "DepthwiseConv2dNative": _depthwise,
    "AvgPool": _avg_pool,
    "MaxPool": _max_pool,
    "AddV2": _add,
    "Add": _add,
    "Sub": _sub,
    "Mul": _mul,
    "BiasAdd": _bias_add,
    "Mean": _mean,
    "Sum": _sum,
    "ConcatV2": _concat,
    "Reshape": _reshape_back,
    "Squeeze": _reshape_back,
    "ExpandDims": _reshape_back,
    "MatMul": _matmul,
    "Sigmoid": _sigmoid,
    "Tanh": _tanh,
    "Transpose": _transpose,
}

COVERED_OP_TYPES = frozenset(GRADIENTS) | frozenset(rules.REWRITABLE_OP_TYPES)

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register every portable gradient (idempotent, thread-safe)."""
    global _registered
    with _lock:
        if _registered:
            return
        for op_type, fn in GRADIENTS.items():
            _register(gradient_op_type(op_type), fn)
        for rule_name, by_type in RELU_RULES.items():
            for op_type, gate in by_type.items():
                _register(relu_gradient_op_type(rule_name, op_type), _relu_gradient(gate))
        _registered = True


def _relu_gradient(gate):
    def _gradient(op, dy):
        rules.note_application(op)  # the converter proves each selected site got its rule
        return gate(dy, op.outputs[0])

    return _gradient


def _register(name: str, fn: Callable) -> None:
    if not tf_internals.is_gradient_registered(name):
        tf.RegisterGradient(name)(fn)
