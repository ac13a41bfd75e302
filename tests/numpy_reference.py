"""Independent numpy reference for guided backpropagation.

This module shares no code with ``gbp_rewrite`` and does not use TensorFlow.
It evaluates small models described by a *layer spec* in float64, and computes
saliency maps by hand-written backward passes in which the gradients of the
ReLU family are replaced according to a rule (Springenberg et al. 2014):

* ``"guided"``:    Relu  dx = dy * [x > 0] * [dy > 0]
                   Relu6 dx = dy * [0 < x < 6] * [dy > 0]
* ``"deconvnet"``: Relu, Relu6  dx = dy * [dy > 0]   (no forward mask)
* ``"vanilla"``:   the true gradient (Relu dx = dy * [x > 0],
                   Relu6 dx = dy * [0 < x < 6]), matching TF's ReluGrad/Relu6Grad.

A capped ReLU (``max_value=k``) is a Relu followed by a clip at ``k``: the
rule applies at the Relu to the gradient the clip passes, ``dy * [x < k]``
(guided: ``dy * [0 < x < k] * [dy > 0]``).  Activations that are not ReLU
units keep their true gradient under every rule: ``hard_sigmoid(x) =
clip(x / 6 + 1/2, 0, 1)`` (derivative 1/6 on (-3, 3)), ``hard_silu(x) = x *
hard_sigmoid(x)`` (derivative (2x + 3) / 6 on (-3, 3), 1 above), and the
thresholded ReLU ``x * [x > t]`` (derivative ``[x > t]``).

Smooth activations (swish, gelu, gelu_tanh, mish, elu, selu, softplus, tanh,
the sigmoid of a squeeze-and-excitation block, hard_sigmoid, hard_silu) keep
their true gradient ``f'(z) * dy`` by default; ``saliency(...,
smooth_activations="guided")`` gives them the guided extension (not in
Springenberg et al.): ``f'(z) * dy * [dy > 0]``, the derivative written out
by hand here in float64.

Every other op keeps its true gradient.  Max-pooling routes the gradient to
the first arg-max (row-major) of each window, like TensorFlow's MaxPoolGrad.

Layer spec
----------
A model is a list of layer dicts (layout NHWC, like TensorFlow)::

    {"type": "conv2d", "name": "conv1", "kernel": W[kh, kw, cin, cout],
     "bias": b[cout] or None, "strides": 1 | 2 | (sh, sw),
     "padding": "valid" | "same", "activation": None | "relu" | "relu6"}
    {"type": "dense", "name": "fc", "kernel": W[cin, cout], "bias": b[cout],
     "activation": None | "relu" | "relu6" | "softmax" | "sigmoid"}
    {"type": "relu"}            {"type": "relu6"}
    {"type": "relu", "max_value": k}   # ReLU capped at k (Keras: Relu + Minimum)
    {"type": "relu", "threshold": t}   # x if x > t else 0 (Keras: Greater + Select)
    {"type": "maxpool", "pool": 2, "strides": 2}        # valid padding
    {"type": "flatten"}         {"type": "gap"}          # global avg pooling
    {"type": "batchnorm", "gamma", "beta", "mean", "var", "epsilon"}
    {"type": "softmax"}   {"type": "sigmoid"}            # last layer only
    {"type": "residual", "layers": [...]}                # y = x + f(x)
    {"type": "activation", "activation": name}           # Keras' Activation layer
    {"type": "pointwise", ...dense keys}                 # dense on the last axis of any rank
    {"type": "layernorm", "gamma", "beta", "epsilon"}    # over the last axis
    {"type": "se", "reduce": {"kernel", "bias", "activation"},
     "expand": {"kernel", "bias"}}   # x * sigmoid(expand(act(reduce(mean_hw x))))

``"name"`` is optional on every layer; ``keras_model`` passes it to Keras.

Score
-----
One scalar per example: output unit ``c`` where ``c`` is ``class_index`` or,
by default, the arg-max of the model output.  If the model ends in softmax,
``score="logit"`` uses the pre-softmax logit ``z_c`` (the softmax gradient is
replaced by the identity, i.e. the seed is one-hot(c) on the logits) and
``score="probability"`` uses ``softmax(z)_c`` with its true gradient.  Without
a softmax both scores are the output unit ``c``.

A model ending in sigmoid is scored the same way per unit (``z_c`` or
``sigmoid(z)_c``; the default class is the arg-max), except a *binary* one
(one output unit, p = sigmoid(z)): its classes are 1 (score ``z``, or ``p``)
and 0 (score ``-z``, or ``1 - p``), the default class is 1 where p > 0.5,
and the seed on the output is +1 or -1, so under the guided rule class 0's
map is the gated backprop of a negative seed, not the negated map of class 1.
"""

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

RULES = ("guided", "deconvnet", "vanilla")
SCORES = ("logit", "probability")
SPEC_KINDS = ("mlp", "cnn", "residual_bn")
DEFAULT_INPUT_SHAPE = (8, 8, 3)
RELU6_CAP = 6.0
SMOOTH = ("swish", "gelu", "gelu_tanh", "mish", "elu", "selu", "softplus", "tanh", "hard_sigmoid", "hard_silu")
ACTIVATIONS = (None, "linear", "relu", "relu6", "softmax", "sigmoid") + SMOOTH
SMOOTH_MODES = ("true", "guided")
SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
GELU_TANH_COEFF = 0.044715
HARD_KINK = 3.0  # hard_sigmoid and hard_silu bend at -3 and 3
SQUASHING = ("softmax", "sigmoid")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def _pair(value):
    """Return ``value`` as a pair of ints (accepts an int or a 2-sequence)."""
    if np.ndim(value) == 0:
        return int(value), int(value)
    first, second = value
    return int(first), int(second)


def same_padding(size, kernel, stride):
    """TensorFlow "SAME" padding ``(before, after)`` along one spatial axis.

    The output size is ``ceil(size / stride)``; the total padding is split
    with the extra element (if any) going *after* (bottom/right).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _spatial_padding(x_shape, kernel_hw, strides, padding):
    """Return ``((top, bottom), (left, right))`` for a conv on ``x_shape``."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        return (same_padding(x_shape[1], kernel_hw[0], strides[0]),
                same_padding(x_shape[2], kernel_hw[1], strides[1]))
    raise ValueError(f"unknown padding {padding!r}")


def _windows(x, window_hw, strides):
    """Strided sliding windows of NHWC ``x``: shape [N, oh, ow, C, kh, kw]."""
    (kh, kw), (sh, sw) = window_hw, strides
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"window {window_hw} larger than input {x.shape}")
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))
    return win[:, ::sh, ::sw][:, :out_h, :out_w]


def _window_slice(offset, stride, count):
    """Slice selecting input rows hit by window offset ``offset``."""
    return slice(offset, offset + stride * (count - 1) + 1, stride)


# --------------------------------------------------------------------------
# Activations (forward and rule-dependent backward)
# --------------------------------------------------------------------------

def _softmax(z):
    """Numerically stable softmax over the last axis."""
    shifted = z - z.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _sigmoid(z):
    """Numerically stable logistic function."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _sigmoid_backward(y, dy, score):
    """Sigmoid backward: identity for ``score="logit"``, y (1 - y) dy else."""
    if score == "logit":
        return dy
    return dy * y * (1.0 - y)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _smooth_forward(name, z):
    """A smooth activation of ``z`` (float64)."""
    if name == "swish":
        return z * _sigmoid(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / np.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + GELU_TANH_COEFF * z ** 3)))
    if name == "mish":
        return z * np.tanh(np.logaddexp(0.0, z))
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))
    if name == "selu":
        return SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * np.expm1(np.minimum(z, 0.0)))
    if name == "softplus":
        return np.logaddexp(0.0, z)
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "hard_sigmoid":
        return np.clip(z / 6.0 + 0.5, 0.0, 1.0)
    if name == "hard_silu":
        return z * np.clip(z / 6.0 + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown smooth activation {name!r}")


def _smooth_derivative(name, z):
    """f'(z) of a smooth activation, written out by hand."""
    if name == "swish":
        s = _sigmoid(z)
        return s + z * s * (1.0 - s)
    if name == "gelu":
        return 0.5 * (1.0 + _erf(z / np.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)
    if name == "gelu_tanh":
        c = np.sqrt(2.0 / np.pi)
        t = np.tanh(c * (z + GELU_TANH_COEFF * z ** 3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * GELU_TANH_COEFF * z * z)
    if name == "mish":
        t = np.tanh(np.logaddexp(0.0, z))
        return t + z * (1.0 - t * t) * _sigmoid(z)
    if name == "elu":
        return np.where(z > 0, 1.0, np.exp(np.minimum(z, 0.0)))
    if name == "selu":
        return SELU_SCALE * np.where(z > 0, 1.0, SELU_ALPHA * np.exp(np.minimum(z, 0.0)))
    if name in ("softplus", "sigmoid"):
        s = _sigmoid(z)
        return s if name == "softplus" else s * (1.0 - s)
    if name == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if name == "hard_sigmoid":  # not a ReLU unit: kinks at -3 and 3
        return np.where(np.abs(z) < HARD_KINK, 1.0 / 6.0, 0.0)
    if name == "hard_silu":
        inside = np.abs(z) < HARD_KINK
        return np.where(inside, (2.0 * z + 3.0) / 6.0, (z >= HARD_KINK).astype(np.float64))
    raise ValueError(f"unknown smooth activation {name!r}")


def _smooth_backward(name, z, dy, ctx):
    """f'(z) * dy (the true gradient), or with ``smooth_activations="guided"``
    the guided extension f'(z) * dy * [dy > 0]."""
    if ctx.get("smooth", "true") == "guided":
        dy = dy * (dy > 0)
    return _smooth_derivative(name, z) * dy


def _activation_forward(name, z):
    """Apply activation ``name`` to pre-activation ``z``."""
    if name in (None, "linear"):
        return z
    if name in SMOOTH:
        return _smooth_forward(name, z)
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "relu6":
        return np.clip(z, 0.0, RELU6_CAP)
    if name == "softmax":
        return _softmax(z)
    if name == "sigmoid":
        return _sigmoid(z)
    raise ValueError(f"unknown activation {name!r}")


def _relu_family_backward(z, dy, rule, cap):
    """Backward of Relu (``cap=None``) or Relu6 (``cap=6``) under ``rule``."""
    backward_positive = dy > 0
    if rule == "deconvnet":
        return dy * backward_positive
    forward_mask = z > 0
    if cap is not None:
        forward_mask &= z < cap
    if rule == "vanilla":
        return dy * forward_mask
    if rule == "guided":
        return dy * forward_mask * backward_positive
    raise ValueError(f"unknown rule {rule!r}")


def _softmax_backward(probs, dy, score):
    """Softmax backward: identity for ``score="logit"``, true Jacobian else."""
    if score == "logit":
        return dy
    return probs * (dy - np.sum(dy * probs, axis=-1, keepdims=True))


def _activation_backward(name, z, y, dy, ctx):
    """Backward of activation ``name`` (pre-activation z, output y)."""
    if name in (None, "linear"):
        return dy
    if name == "relu":
        return _relu_family_backward(z, dy, ctx["rule"], None)
    if name == "relu6":
        return _relu_family_backward(z, dy, ctx["rule"], RELU6_CAP)
    if name == "softmax":
        return _softmax_backward(y, dy, ctx["score"])
    if name in SMOOTH:  # not ReLU units: the true gradient under every rule, or the extension
        return _smooth_backward(name, z, dy, ctx)
    if name == "sigmoid":
        return _sigmoid_backward(y, dy, ctx["score"])
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------
# Layers: each type has forward(layer, x) -> (y, cache) and
# backward(layer, cache, dy, ctx) -> dx.
# --------------------------------------------------------------------------

def _bias(layer, channels):
    """The layer's bias, or zeros when it has none."""
    bias = layer.get("bias")
    return np.zeros(channels) if bias is None else np.asarray(bias, np.float64)


def _conv2d_affine(layer, x):
    """Convolution plus bias (no activation); returns (z, padded_shape, pads)."""
    kernel = np.asarray(layer["kernel"], np.float64)
    kh, kw, cin, cout = kernel.shape
    if x.shape[-1] != cin:
        raise ValueError(f"conv2d expects {cin} channels, got {x.shape}")
    strides = _pair(layer.get("strides", 1))
    pad_h, pad_w = _spatial_padding(x.shape, (kh, kw), strides,
                                    layer.get("padding", "valid"))
    padded = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    windows = _windows(padded, (kh, kw), strides)
    z = np.einsum("nhwcij,ijco->nhwo", windows, kernel) + _bias(layer, cout)
    return z, padded.shape, (pad_h, pad_w)


def _conv2d_affine_backward(layer, cache, dz):
    """Gradient of the convolution w.r.t. its (unpadded) input."""
    kernel = np.asarray(layer["kernel"], np.float64)
    kh, kw = kernel.shape[:2]
    sh, sw = _pair(layer.get("strides", 1))
    (top, bottom), (left, right) = cache["pads"]
    out_h, out_w = dz.shape[1:3]
    dpadded = np.zeros(cache["padded_shape"])
    for i in range(kh):
        for j in range(kw):
            rows = _window_slice(i, sh, out_h)
            cols = _window_slice(j, sw, out_w)
            dpadded[:, rows, cols, :] += np.einsum("nhwo,co->nhwc", dz,
                                                   kernel[i, j])
    height, width = dpadded.shape[1:3]
    return dpadded[:, top:height - bottom, left:width - right, :]


def _conv2d_forward(layer, x):
    """Conv2D with optional fused activation."""
    z, padded_shape, pads = _conv2d_affine(layer, x)
    y = _activation_forward(layer.get("activation"), z)
    return y, {"z": z, "y": y, "padded_shape": padded_shape, "pads": pads}


def _conv2d_backward(layer, cache, dy, ctx):
    """Backward of Conv2D with optional fused activation."""
    dz = _activation_backward(layer.get("activation"), cache["z"], cache["y"],
                              dy, ctx)
    return _conv2d_affine_backward(layer, cache, dz)


def _dense_forward(layer, x):
    """Dense layer on [N, features] with optional fused activation."""
    kernel = np.asarray(layer["kernel"], np.float64)
    if x.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(f"dense expects [N, {kernel.shape[0]}], got {x.shape}")
    z = x @ kernel + _bias(layer, kernel.shape[1])
    y = _activation_forward(layer.get("activation"), z)
    return y, {"z": z, "y": y}


def _dense_backward(layer, cache, dy, ctx):
    """Backward of Dense with optional fused activation."""
    dz = _activation_backward(layer.get("activation"), cache["z"], cache["y"],
                              dy, ctx)
    return dz @ np.asarray(layer["kernel"], np.float64).T


def _relu_forward(layer, x):
    """Standalone ReLU, optionally capped at ``max_value`` or thresholded at ``threshold``."""
    threshold = layer.get("threshold")
    if threshold:
        return np.where(x > threshold, x, 0.0), {"z": x}
    y = np.maximum(x, 0.0)
    if layer.get("max_value") is not None:
        y = np.minimum(y, float(layer["max_value"]))
    return y, {"z": x}


def _relu_backward(layer, cache, dy, ctx):
    """Standalone ReLU backward under the rule; a threshold keeps its true gradient."""
    z = cache["z"]
    threshold = layer.get("threshold")
    if threshold:  # not a ReLU op: Greater + Select pass dy where x > t
        return dy * (z > threshold)
    if layer.get("max_value") is not None:  # the clip's own gradient, then the rule at the Relu
        dy = dy * (z < float(layer["max_value"]))
    return _relu_family_backward(z, dy, ctx["rule"], None)


def _relu6_forward(layer, x):
    """Standalone ReLU6."""
    return np.clip(x, 0.0, RELU6_CAP), {"z": x}


def _relu6_backward(layer, cache, dy, ctx):
    """Standalone ReLU6 backward under the rule."""
    return _relu_family_backward(cache["z"], dy, ctx["rule"], RELU6_CAP)


def _maxpool_geometry(layer):
    """Pool size and strides (strides default to the pool size)."""
    if layer.get("padding", "valid") != "valid":
        raise ValueError("maxpool supports only valid padding")
    pool = _pair(layer.get("pool", 2))
    strides = _pair(layer.get("strides", pool))
    return pool, strides


def _maxpool_forward(layer, x):
    """Valid max-pooling; caches the first (row-major) arg-max per window."""
    pool, strides = _maxpool_geometry(layer)
    windows = _windows(x, pool, strides)
    flat = windows.reshape(windows.shape[:4] + (-1,))
    argmax = flat.argmax(axis=-1)
    y = np.take_along_axis(flat, argmax[..., None], axis=-1)[..., 0]
    return y, {"argmax": argmax, "x_shape": x.shape, "flat": flat}


def _maxpool_backward(layer, cache, dy, ctx):
    """Route each window's gradient to its arg-max input position."""
    (ph, pw), (sh, sw) = _maxpool_geometry(layer)
    out_h, out_w = dy.shape[1:3]
    dx = np.zeros(cache["x_shape"])
    for i in range(ph):
        for j in range(pw):
            chosen = cache["argmax"] == i * pw + j
            rows = _window_slice(i, sh, out_h)
            cols = _window_slice(j, sw, out_w)
            dx[:, rows, cols, :] += dy * chosen
    return dx


def _flatten_forward(layer, x):
    """Flatten all non-batch axes (NHWC order, like Keras Flatten)."""
    return x.reshape(x.shape[0], -1), {"x_shape": x.shape}


def _flatten_backward(layer, cache, dy, ctx):
    """Undo the flatten."""
    return dy.reshape(cache["x_shape"])


def _gap_forward(layer, x):
    """Global average pooling over H and W."""
    return x.mean(axis=(1, 2)), {"x_shape": x.shape}


def _gap_backward(layer, cache, dy, ctx):
    """Spread the gradient evenly over H and W."""
    _, height, width, _ = cache["x_shape"]
    dx = np.broadcast_to(dy[:, None, None, :] / (height * width),
                         cache["x_shape"])
    return dx.copy()


def _batchnorm_scale_shift(layer):
    """Inference batch-norm as per-channel ``y = scale * x + shift``."""
    gamma = np.asarray(layer["gamma"], np.float64)
    beta = np.asarray(layer["beta"], np.float64)
    mean = np.asarray(layer["mean"], np.float64)
    var = np.asarray(layer["var"], np.float64)
    scale = gamma / np.sqrt(var + float(layer.get("epsilon", 1e-3)))
    return scale, beta - mean * scale


def _batchnorm_forward(layer, x):
    """Inference-mode batch normalisation over the last axis."""
    scale, shift = _batchnorm_scale_shift(layer)
    return x * scale + shift, {}


def _batchnorm_backward(layer, cache, dy, ctx):
    """Batch-norm (inference) backward: multiply by the per-channel scale."""
    scale, _ = _batchnorm_scale_shift(layer)
    return dy * scale


def _softmax_forward(layer, x):
    """Softmax over the last axis."""
    y = _softmax(x)
    return y, {"y": y}


def _softmax_layer_backward(layer, cache, dy, ctx):
    """Softmax backward (identity when ``score="logit"``)."""
    return _softmax_backward(cache["y"], dy, ctx["score"])


def _sigmoid_layer_forward(layer, x):
    """Elementwise logistic function."""
    y = _sigmoid(x)
    return y, {"y": y}


def _sigmoid_layer_backward(layer, cache, dy, ctx):
    """Sigmoid backward (identity when ``score="logit"``)."""
    return _sigmoid_backward(cache["y"], dy, ctx["score"])


def _residual_forward(layer, x):
    """``y = x + f(x)`` with ``f`` the inner layer list."""
    fx, tape = _forward_layers(layer["layers"], x)
    if fx.shape != x.shape:
        raise ValueError(f"residual branch changes shape {x.shape}->{fx.shape}")
    return x + fx, {"tape": tape}


def _residual_backward(layer, cache, dy, ctx):
    """Gradient of the skip connection plus that of the branch."""
    return dy + _backward_layers(cache["tape"], dy, ctx)


def _pointwise_forward(layer, x):
    """Dense on the last axis of a tensor of any rank (Keras' Dense on [N, H, W, C])."""
    kernel = np.asarray(layer["kernel"], np.float64)
    z = x @ kernel + _bias(layer, kernel.shape[1])
    y = _activation_forward(layer.get("activation"), z)
    return y, {"z": z, "y": y}


def _layernorm_forward(layer, x):
    """Layer normalisation over the last axis (population variance)."""
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    inv = 1.0 / np.sqrt((centred ** 2).mean(axis=-1, keepdims=True) + float(layer.get("epsilon", 1e-3)))
    xhat = centred * inv
    y = xhat * np.asarray(layer["gamma"], np.float64) + np.asarray(layer["beta"], np.float64)
    return y, {"xhat": xhat, "inv": inv}


def _layernorm_backward(layer, cache, dy, ctx):
    """d(layernorm)/dx: inv * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma."""
    g = dy * np.asarray(layer["gamma"], np.float64)
    xhat = cache["xhat"]
    return cache["inv"] * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))


def _se_forward(layer, x):
    """Squeeze-and-excitation: x * sigmoid(expand(act(reduce(mean over H, W of x))))."""
    squeezed = x.mean(axis=(1, 2))
    reduce, expand = layer["reduce"], layer["expand"]
    z1 = squeezed @ np.asarray(reduce["kernel"], np.float64) + _bias(reduce, np.shape(reduce["kernel"])[1])
    r = _activation_forward(reduce.get("activation"), z1)
    z2 = r @ np.asarray(expand["kernel"], np.float64) + _bias(expand, np.shape(expand["kernel"])[1])
    gate = _sigmoid(z2)
    return x * gate[:, None, None, :], {"x": x, "z1": z1, "r": r, "z2": z2, "gate": gate}


def _se_backward(layer, cache, dy, ctx):
    """The product's two paths: dy * gate, and through the gate (a hidden sigmoid, a smooth
    activation) and the reduce activation back to the squeezed mean."""
    x, gate = cache["x"], cache["gate"]
    height, width = x.shape[1:3]
    dgate = (dy * x).sum(axis=(1, 2))
    dz2 = _smooth_backward("sigmoid", cache["z2"], dgate, ctx)
    dr = dz2 @ np.asarray(layer["expand"]["kernel"], np.float64).T
    dz1 = _activation_backward(layer["reduce"].get("activation"), cache["z1"], cache["r"], dr, ctx)
    dsqueezed = dz1 @ np.asarray(layer["reduce"]["kernel"], np.float64).T
    return dy * gate[:, None, None, :] + dsqueezed[:, None, None, :] / (height * width)


def _standalone_activation_forward(layer, x):
    """An activation on its own (Keras' Activation layer)."""
    y = _activation_forward(layer["activation"], x)
    return y, {"z": x, "y": y}


def _standalone_activation_backward(layer, cache, dy, ctx):
    return _activation_backward(layer["activation"], cache["z"], cache["y"], dy, ctx)


_LAYER_OPS = {
    "activation": (_standalone_activation_forward, _standalone_activation_backward),
    "pointwise": (_pointwise_forward, _dense_backward),
    "layernorm": (_layernorm_forward, _layernorm_backward),
    "se": (_se_forward, _se_backward),
    "conv2d": (_conv2d_forward, _conv2d_backward),
    "dense": (_dense_forward, _dense_backward),
    "relu": (_relu_forward, _relu_backward),
    "relu6": (_relu6_forward, _relu6_backward),
    "maxpool": (_maxpool_forward, _maxpool_backward),
    "flatten": (_flatten_forward, _flatten_backward),
    "gap": (_gap_forward, _gap_backward),
    "batchnorm": (_batchnorm_forward, _batchnorm_backward),
    "softmax": (_softmax_forward, _softmax_layer_backward),
    "sigmoid": (_sigmoid_layer_forward, _sigmoid_layer_backward),
    "residual": (_residual_forward, _residual_backward),
}


def _layer_ops(layer):
    """Look up (forward, backward) for a layer dict."""
    try:
        return _LAYER_OPS[layer["type"]]
    except KeyError:
        raise ValueError(f"unknown layer type {layer.get('type')!r}") from None


def _forward_layers(layers, x):
    """Run ``layers`` on ``x``; return output and the tape for backward."""
    tape = []
    for layer in layers:
        forward_fn, _ = _layer_ops(layer)
        y, cache = forward_fn(layer, x)
        tape.append((layer, cache))
        x = y
    return x, tape


def _backward_layers(tape, dy, ctx):
    """Back-propagate ``dy`` through a tape produced by ``_forward_layers``."""
    for layer, cache in reversed(tape):
        _, backward_fn = _layer_ops(layer)
        dy = backward_fn(layer, cache, dy, _layer_ctx(layer, ctx))
    return dy


def _layer_ctx(layer, ctx):
    """The context for one layer: its own rule when ``layer_rules`` names it."""
    rule = ctx.get("layer_rules", {}).get(layer.get("name"))
    return ctx if rule is None else dict(ctx, rule=rule)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

def forward(spec, x):
    """Model output (float64) for a batch ``x`` of shape [batch, ...]."""
    y, _ = _forward_layers(spec, np.asarray(x, np.float64))
    return y


def ends_in_softmax(spec):
    """True if the last layer is a softmax (standalone or fused in dense)."""
    if not spec:
        return False
    return ends_in(spec, "softmax")


def ends_in(spec, squashing):
    """True if the last layer is ``squashing`` ("softmax" or "sigmoid"),
    standalone or fused in a dense layer."""
    if not spec:
        return False
    last = spec[-1]
    return last["type"] == squashing or last.get("activation") == squashing


def is_binary_sigmoid(spec, output):
    """True for a sigmoid model with one output unit (classes 0 and 1)."""
    return ends_in(spec, "sigmoid") and output.shape[-1] == 1


def _check_softmax_placement(layers, top_level=True):
    """Softmax and sigmoid are only allowed as the very last top-level layer."""
    for index, layer in enumerate(layers):
        is_last = top_level and index == len(layers) - 1
        has_softmax = (layer["type"] in SQUASHING
                       or layer.get("activation") in SQUASHING)
        if has_softmax and not is_last:
            raise ValueError("softmax/sigmoid is only supported as the last layer")
        if layer["type"] == "residual":
            _check_softmax_placement(layer["layers"], top_level=False)


def _resolve_classes(output, class_index, binary=False):
    """Per-example class indices: arg-max by default (binary: p > 0.5), else
    broadcast."""
    batch, num_classes = output.shape
    if binary:
        num_classes = 2
        if class_index is None:
            return (output[:, 0] > 0.5).astype(np.int64)
    if class_index is None:
        return output.argmax(axis=-1)
    classes = np.broadcast_to(np.asarray(class_index, np.int64), (batch,))
    if np.any(classes < 0) or np.any(classes >= num_classes):
        raise ValueError(f"class_index out of range for {num_classes} classes")
    return classes.copy()


def _class_seed(output, classes, binary):
    """d(score)/d(output): one-hot at each example's class; a binary sigmoid's
    one unit gets +1 for class 1 (score z or p) and -1 for class 0 (-z or 1 - p)."""
    seed = np.zeros_like(output)
    if binary:
        seed[:, 0] = np.where(classes == 1, 1.0, -1.0)
    else:
        seed[np.arange(len(classes)), classes] = 1.0
    return seed


def saliency(spec, x, *, rule="guided", score="logit", class_index=None,
             layer_rules=None, smooth_activations="true"):
    """Saliency map d(score)/d(input) with the ReLU gradients of ``rule``.

    Args:
      spec: layer spec (list of layer dicts), output must be [batch, classes].
      x: inputs, shape [batch, ...].
      rule: "guided", "deconvnet" or "vanilla".
      score: "logit" or "probability" (only differ if the model ends in
        softmax or sigmoid, see the module docstring).
      class_index: None (top class per example), an int, or one int per
        example.
      layer_rules: optional {layer name: rule} overriding ``rule`` for the
        ReLUs of the named layers (a partial layer selection is ``rule=
        "vanilla"`` plus the selected layers mapped to the rewriting rule).
      smooth_activations: "true" (the smooth activations' true gradient) or
        "guided" (the guided extension: f'(z) * dy * [dy > 0]).

    Returns:
      (saliency, classes): float64 array shaped like ``x`` and int64 [batch].
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    _check_softmax_placement(spec)
    x = np.asarray(x, np.float64)
    output, tape = _forward_layers(spec, x)
    if output.ndim != 2:
        raise ValueError(f"model output must be [batch, classes], got "
                         f"{output.shape}")
    binary = is_binary_sigmoid(spec, output)
    classes = _resolve_classes(output, class_index, binary)
    seed = _class_seed(output, classes, binary)
    if smooth_activations not in SMOOTH_MODES:
        raise ValueError(f"smooth_activations must be one of {SMOOTH_MODES}, got {smooth_activations!r}")
    ctx = {"rule": rule, "score": score, "layer_rules": dict(layer_rules or {}),
           "smooth": smooth_activations}
    return _backward_layers(tape, seed, ctx), classes


def score_value(spec, x, *, score="logit", class_index=None):
    """The scalar score per example that ``saliency`` differentiates.

    Useful for finite differences; ``class_index`` is resolved like in
    ``saliency``.  Returns (scores [batch], classes [batch]).
    """
    x = np.asarray(x, np.float64)
    output = forward(spec, x)
    binary = is_binary_sigmoid(spec, output)
    classes = _resolve_classes(output, class_index, binary)
    squashing = next((name for name in SQUASHING if ends_in(spec, name)), None)
    if score == "logit" and squashing is not None:
        last = spec[-1]
        if last["type"] == squashing:
            output = forward(spec[:-1], x)
        else:
            logits_layer = dict(last, activation=None)
            output = forward(list(spec[:-1]) + [logits_layer], x)
    if binary:  # class 1: z or p; class 0: -z or 1 - p
        unit = output[:, 0]
        other = -unit if score == "logit" else 1.0 - unit
        return np.where(classes == 1, unit, other), classes
    return output[np.arange(len(classes)), classes], classes


def _tape_margins(tape, margins):
    """Append per-example kink distances found in ``tape`` to ``margins``."""
    for layer, cache in tape:
        kind = layer["type"]
        activation = layer.get("activation")
        if kind in ("relu", "relu6") or activation in ("relu", "relu6", "hard_sigmoid", "hard_silu"):
            z = cache["z"].reshape(len(cache["z"]), -1)
            distance = np.abs(z - (layer.get("threshold") or 0.0))
            if "relu6" in (kind, activation):
                distance = np.minimum(distance, np.abs(z - RELU6_CAP))
            if kind == "relu" and layer.get("max_value") is not None:
                distance = np.minimum(distance, np.abs(z - float(layer["max_value"])))
            if activation in ("hard_sigmoid", "hard_silu"):
                distance = np.abs(np.abs(z) - HARD_KINK)
            margins.append(distance.min(axis=1))
        elif kind == "maxpool":
            top_two = -np.sort(-cache["flat"], axis=-1)[..., :2]
            gap = top_two[..., 0] - top_two[..., 1]
            gap = np.where(gap == 0.0, np.inf, gap)  # exact ties are benign
            margins.append(gap.reshape(len(gap), -1).min(axis=1))
        elif kind == "residual":
            _tape_margins(cache["tape"], margins)


def kink_margin(spec, x):
    """Per-example distance of ``x`` from the non-differentiable points.

    The minimum over all ReLU/ReLU6 pre-activations of their distance to 0
    (and to 6 for ReLU6), and over all max-pool windows of the gap between
    the largest and second-largest value (exact ties, e.g. windows of ReLU
    zeros, are ignored because both TF and this reference break them the same
    way: first arg-max in row-major order).  Inputs with a comfortable margin
    give identical ReLU masks in float32 and float64.
    """
    x = np.asarray(x, np.float64)
    _, tape = _forward_layers(spec, x)
    margins = [np.full(len(x), np.inf)]
    _tape_margins(tape, margins)
    return np.min(np.stack(margins), axis=0)


# --------------------------------------------------------------------------
# Keras equivalent
# --------------------------------------------------------------------------

def _keras_activation(name):
    """Map a spec activation to a Keras ``activation=`` argument."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}")
    if name == "gelu_tanh":  # Keras' "gelu" is the exact form
        import keras  # pylint: disable=import-outside-toplevel
        return lambda t: keras.activations.gelu(t, approximate=True)
    return name or "linear"


def _with_weights(keras_layer, x, weights):
    """Apply ``keras_layer`` to ``x`` (which builds it), then give it ``weights`` (float32)."""
    y = keras_layer(x)
    keras_layer.set_weights([np.asarray(w, np.float32) for w in weights])
    return y


def _kernel_and_bias(layer):
    """A conv2d/dense spec layer's weights in Keras order; no bias when it has none."""
    bias = layer.get("bias")
    return [layer["kernel"]] + ([] if bias is None else [bias])


def _keras_conv2d(keras, layer, x):
    """A Conv2D with the weights of ``layer``, applied to ``x``."""
    kernel_shape = np.shape(layer["kernel"])
    keras_layer = keras.layers.Conv2D(
        filters=kernel_shape[3], kernel_size=kernel_shape[:2],
        strides=_pair(layer.get("strides", 1)),
        padding=layer.get("padding", "valid"),
        activation=_keras_activation(layer.get("activation")),
        use_bias=layer.get("bias") is not None, name=layer.get("name"))
    return _with_weights(keras_layer, x, _kernel_and_bias(layer))


def _keras_dense(keras, layer, x):
    """A Dense with the weights of ``layer``, applied to ``x``."""
    keras_layer = keras.layers.Dense(
        np.shape(layer["kernel"])[1],
        activation=_keras_activation(layer.get("activation")),
        use_bias=layer.get("bias") is not None, name=layer.get("name"))
    return _with_weights(keras_layer, x, _kernel_and_bias(layer))


def _keras_batchnorm(keras, layer, x):
    """A BatchNormalization with the statistics of ``layer``, applied to ``x``."""
    keras_layer = keras.layers.BatchNormalization(
        epsilon=float(layer.get("epsilon", 1e-3)), name=layer.get("name"))
    return _with_weights(keras_layer, x, [layer[key] for key in
                                          ("gamma", "beta", "mean", "var")])


def _keras_layer(keras, layer, x):
    """Apply the Keras equivalent of one spec layer to tensor ``x``."""
    kind, name = layer["type"], layer.get("name")
    if kind == "conv2d":
        return _keras_conv2d(keras, layer, x)
    if kind == "dense":
        return _keras_dense(keras, layer, x)
    if kind == "batchnorm":
        return _keras_batchnorm(keras, layer, x)
    if kind == "relu":
        return keras.layers.ReLU(max_value=layer.get("max_value"), threshold=layer.get("threshold") or 0.0,
                                 name=name)(x)
    if kind == "relu6":
        return keras.layers.ReLU(max_value=6.0, name=name)(x)
    if kind == "maxpool":
        pool, strides = _maxpool_geometry(layer)
        return keras.layers.MaxPooling2D(pool, strides, padding="valid",
                                         name=name)(x)
    if kind == "flatten":
        return keras.layers.Flatten(name=name)(x)
    if kind == "gap":
        return keras.layers.GlobalAveragePooling2D(name=name)(x)
    if kind == "softmax":
        return keras.layers.Softmax(name=name)(x)
    if kind == "sigmoid":
        return keras.layers.Activation("sigmoid", name=name)(x)
    if kind == "residual":
        branch = _keras_layers(keras, layer["layers"], x)
        return keras.layers.Add(name=name)([x, branch])
    if kind == "pointwise":
        return _keras_dense(keras, layer, x)
    if kind == "activation":
        return keras.layers.Activation(_keras_activation(layer["activation"]), name=name)(x)
    if kind == "layernorm":
        keras_layer = keras.layers.LayerNormalization(epsilon=float(layer.get("epsilon", 1e-3)), name=name)
        return _with_weights(keras_layer, x, [layer["gamma"], layer["beta"]])
    if kind == "se":
        return _keras_se(keras, layer, x)
    raise ValueError(f"unknown layer type {kind!r}")


def _keras_se(keras, layer, x):
    """EfficientNet's squeeze-and-excitation: mean over H, W (kept), 1x1 convs, Multiply."""
    name = layer.get("name") or "se"
    squeezed = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_squeeze")(x)
    convs = []
    for part, activation in (("reduce", layer["reduce"].get("activation")), ("expand", "sigmoid")):
        weights = layer[part]
        kernel = np.asarray(weights["kernel"])[None, None]
        convs.append((keras.layers.Conv2D(kernel.shape[-1], 1, activation=_keras_activation(activation),
                                          name=f"{name}_{part}"), [kernel, weights["bias"]]))
    hidden = _with_weights(convs[0][0], squeezed, convs[0][1])
    gate = _with_weights(convs[1][0], hidden, convs[1][1])
    return keras.layers.Multiply(name=f"{name}_excite")([x, gate])


def _keras_layers(keras, layers, x):
    """Apply a list of spec layers as Keras layers."""
    for layer in layers:
        x = _keras_layer(keras, layer, x)
    return x


def keras_model(spec, input_shape, *, name="ref_model"):
    """A Keras 3 functional model computing ``forward(spec, .)`` (float32).

    Layer names come from the spec's ``"name"`` entries (Keras picks names
    for layers without one).  Batch-norm layers use their moving statistics
    (call the model with ``training=False``).
    """
    import keras  # pylint: disable=import-outside-toplevel

    inputs = keras.Input(shape=tuple(input_shape))
    outputs = _keras_layers(keras, spec, inputs)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------
# Ready-made random specs
# --------------------------------------------------------------------------

def output_shape(spec, input_shape):
    """Per-example output shape of ``spec`` for a per-example input shape."""
    return forward(spec, np.zeros((1,) + tuple(input_shape))).shape[1:]


def random_inputs(input_shape, *, batch, seed, scale=2.0):
    """Inputs ~ N(0, scale**2) of shape [batch, *input_shape] (float64)."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, scale, size=(batch,) + tuple(input_shape))


def _random_conv(rng, name, cin, cout, *, kernel=3, strides=1,
                 padding="same", gain=1.0, activation=None):
    """Conv2d spec with He-style weights times ``gain`` and random bias."""
    std = gain * np.sqrt(2.0 / (kernel * kernel * cin))
    layer = {"type": "conv2d", "name": name,
             "kernel": rng.normal(0.0, std, (kernel, kernel, cin, cout)),
             "bias": rng.normal(0.0, 0.5, cout),
             "strides": strides, "padding": padding}
    if activation is not None:
        layer["activation"] = activation
    return layer


def _random_dense(rng, name, cin, cout, *, gain=1.0, activation=None):
    """Dense spec with He-style weights times ``gain`` and random bias."""
    std = gain * np.sqrt(2.0 / cin)
    layer = {"type": "dense", "name": name,
             "kernel": rng.normal(0.0, std, (cin, cout)),
             "bias": rng.normal(0.0, 0.5, cout)}
    if activation is not None:
        layer["activation"] = activation
    return layer


def _mlp_spec(rng, input_shape, num_classes):
    """flatten -> dense+relu -> dense+relu -> dense."""
    features = int(np.prod(input_shape))
    return [
        {"type": "flatten", "name": "flatten"},
        _random_dense(rng, "fc1", features, 16, activation="relu"),
        _random_dense(rng, "fc2", 16, 12, activation="relu"),
        _random_dense(rng, "logits", 12, num_classes),
    ]


def _cnn_spec(rng, input_shape, num_classes):
    """conv relu maxpool conv(stride 2, same) relu6 flatten dense softmax."""
    head = [
        _random_conv(rng, "conv1", input_shape[-1], 4),
        {"type": "relu", "name": "relu1"},
        {"type": "maxpool", "name": "pool1", "pool": 2, "strides": 2},
        _random_conv(rng, "conv2", 4, 6, strides=2, gain=1.5),
        {"type": "relu6", "name": "relu6_2"},
        {"type": "flatten", "name": "flatten"},
    ]
    features = int(np.prod(output_shape(head, input_shape)))
    return head + [
        _random_dense(rng, "logits", features, num_classes),
        {"type": "softmax", "name": "softmax"},
    ]


def _random_batchnorm(rng, name, channels):
    """Batch-norm spec with non-trivial statistics."""
    return {"type": "batchnorm", "name": name,
            "gamma": rng.uniform(0.5, 2.0, channels),
            "beta": rng.normal(0.0, 0.5, channels),
            "mean": rng.normal(0.0, 1.0, channels),
            "var": rng.uniform(0.5, 4.0, channels),
            "epsilon": 1e-3}


def _residual_bn_spec(rng, input_shape, num_classes):
    """conv(valid) bn relu [conv+relu, conv] residual gap dense."""
    channels = 4
    return [
        _random_conv(rng, "conv1", input_shape[-1], channels, padding="valid"),
        _random_batchnorm(rng, "bn1", channels),
        {"type": "relu", "name": "relu1"},
        {"type": "residual", "name": "add", "layers": [
            _random_conv(rng, "res_conv1", channels, channels,
                         activation="relu"),
            _random_conv(rng, "res_conv2", channels, channels, gain=0.7),
        ]},
        {"type": "gap", "name": "gap"},
        _random_dense(rng, "logits", channels, num_classes, gain=2.0),
    ]


def efficientnet_style_spec(*, seed=7, input_shape=DEFAULT_INPUT_SHAPE, num_classes=4, relu_head=False):
    """EfficientNet's pieces, small: conv+swish, a squeeze-and-excitation block (swish, then the
    sigmoid gate multiplied in), a 1x1 projection, gap, dense softmax. ``relu_head``: a 1x1
    conv+relu before the pooling (so the plain guided rule has a ReLU to rewrite)."""
    rng = np.random.default_rng(seed)
    channels, squeezed = 6, 3
    layers = [
        _random_conv(rng, "stem", input_shape[-1], channels, activation="swish"),
        {"type": "se", "name": "se",
         "reduce": _random_dense(rng, "reduce", channels, squeezed, gain=2.0, activation="swish"),
         "expand": _random_dense(rng, "expand", squeezed, channels, gain=2.0)},
        _random_conv(rng, "project", channels, channels, kernel=1, activation="relu" if relu_head else None),
        {"type": "gap", "name": "gap"},
    ]
    return layers + [
        _random_dense(rng, "logits", channels, num_classes, gain=2.0, activation="softmax"),
    ]


def conv_bn_swish_spec(*, seed=9, input_shape=DEFAULT_INPUT_SHAPE, num_classes=4):
    """EfficientNet's conv, BatchNorm, Activation('swish') (the BatchNorm a graph path folds),
    then gap and dense logits."""
    rng = np.random.default_rng(seed)
    return [
        _random_conv(rng, "conv", input_shape[-1], 6),
        _random_batchnorm(rng, "bn", 6),
        {"type": "activation", "name": "swish", "activation": "swish"},
        {"type": "gap", "name": "gap"},
        _random_dense(rng, "logits", 6, num_classes, gain=2.0),
    ]


def convnext_style_spec(*, seed=8, input_shape=DEFAULT_INPUT_SHAPE, num_classes=4):
    """ConvNeXt's pieces, small: a 2x2 stride-2 patchify conv, then a residual block of conv,
    LayerNorm, pointwise dense + GELU (exact), pointwise dense; gap, LayerNorm, dense logits."""
    rng = np.random.default_rng(seed)
    channels = 6

    def layernorm(name):
        return {"type": "layernorm", "name": name, "gamma": rng.uniform(0.5, 2.0, channels),
                "beta": rng.normal(0.0, 0.5, channels), "epsilon": 1e-6}

    expand = dict(_random_dense(rng, "pw_expand", channels, 12, gain=1.5, activation="gelu"), type="pointwise")
    project = dict(_random_dense(rng, "pw_project", 12, channels), type="pointwise")
    return [
        _random_conv(rng, "patchify", input_shape[-1], channels, kernel=2, strides=2, padding="valid"),
        {"type": "residual", "name": "block", "layers": [
            _random_conv(rng, "block_conv", channels, channels),
            layernorm("block_norm"), expand, project,
        ]},
        {"type": "gap", "name": "gap"},
        layernorm("head_norm"),
        _random_dense(rng, "logits", channels, num_classes, gain=2.0),
    ]


def smooth_chain_spec(*, seed=5, input_shape=DEFAULT_INPUT_SHAPE):
    """flatten, then one dense layer (12 units) per smooth activation (gelu_tanh, mish, elu,
    selu, softplus, tanh, hard_silu, hard_sigmoid, swish, gelu), then one dense unit with a
    sigmoid: a binary classifier whose output sigmoid is the head, not a hidden activation."""
    rng = np.random.default_rng(seed)
    spec = [{"type": "flatten", "name": "flatten"}]
    features = int(np.prod(input_shape))
    for name in ("gelu_tanh", "mish", "elu", "selu", "softplus", "tanh", "hard_silu", "hard_sigmoid",
                 "swish", "gelu"):
        spec.append(_random_dense(rng, f"d_{name}", features, 12, gain=1.5, activation=name))
        features = 12
    return spec + [_random_dense(rng, "logits", features, 1, gain=2.0, activation="sigmoid")]


_SPEC_BUILDERS = {
    "mlp": _mlp_spec,
    "cnn": _cnn_spec,
    "residual_bn": _residual_bn_spec,
}


def random_spec(kind, *, seed, input_shape=DEFAULT_INPUT_SHAPE,
                num_classes=5):
    """A ready-made spec with random weights (deterministic for ``seed``).

    Kinds: "mlp" (flatten, dense+relu, dense+relu, dense), "cnn" (conv, relu,
    maxpool, stride-2 same conv, relu6, flatten, dense, softmax) and
    "residual_bn" (valid conv, batchnorm, relu, residual block of
    conv+relu and conv, global average pooling, dense).  Weight scales are
    chosen so that on ``random_inputs`` (N(0, 2^2)) many units are negative
    and, for relu6, a good fraction saturate above 6.
    """
    if kind not in _SPEC_BUILDERS:
        raise ValueError(f"kind must be one of {SPEC_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    return _SPEC_BUILDERS[kind](rng, tuple(input_shape), num_classes)


# --------------------------------------------------------------------------
# Grad-CAM and Guided Grad-CAM (Selvaraju et al. 2017)
# --------------------------------------------------------------------------

def _resize_weights(in_size, out_size):
    """Bilinear interpolation weights with half-pixel centres, [out, in].

    Output pixel ``i`` samples the input at ``(i + 0.5) * in/out - 0.5``,
    clamped to the first and last input pixels (TensorFlow 2's
    ``tf.image.resize(method="bilinear")`` convention).
    """
    weights = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for i in range(out_size):
        position = (i + 0.5) * scale - 0.5
        floor = np.floor(position)
        lower = int(max(floor, 0))
        upper = int(min(np.ceil(position), in_size - 1))
        fraction = position - floor
        weights[i, lower] += 1.0 - fraction
        weights[i, upper] += fraction
    return weights


def resize_bilinear(maps, size):
    """[batch, h, w] -> [batch, H, W] bilinear (half-pixel centres)."""
    rows = _resize_weights(maps.shape[1], size[0])
    cols = _resize_weights(maps.shape[2], size[1])
    return np.einsum("Hh,bhw,Ww->bHW", rows, maps, cols)


def grad_cam(spec, x, *, layer, rule="guided", score="logit",
             class_index=None, head_rule="vanilla", smooth_activations="true"):
    """Grad-CAM at the output of top-level layer ``layer`` (its name) and
    Guided Grad-CAM, in float64.

    The channel weights are the spatial mean of d(score)/d(A) taken with the
    ReLU gradients of ``head_rule`` above the layer: ``"vanilla"``, the true
    gradient, is Grad-CAM; any other value only serves tests that show a
    rule would change the answer. The map is ReLU(sum_k w_k A_k), resized to
    the input's height and width and divided by its maximum per example (an
    all-zero map stays zero). The guided saliency uses ``rule`` everywhere, and
    ``smooth_activations`` at the smooth activations (the weights: their true
    gradient). Classes are resolved and seeded as in ``saliency``: for a binary
    sigmoid head, class 0's score is -z (or 1 - p), so its weights are class 1's
    negated.

    Returns (gradcam [batch, H, W], guided_gradcam shaped like x, classes).
    """
    names = [entry.get("name") for entry in spec]
    if layer not in names:
        raise ValueError(f"no top-level layer named {layer!r}; layers: {names}")
    split = names.index(layer) + 1
    x = np.asarray(x, np.float64)
    activation, body_tape = _forward_layers(spec[:split], x)
    if activation.ndim != 4:
        raise ValueError(f"layer {layer!r} outputs {activation.shape}, not 4-D")
    output, head_tape = _forward_layers(spec[split:], activation)
    binary = is_binary_sigmoid(spec, output)
    classes = _resolve_classes(output, class_index, binary)
    seed = _class_seed(output, classes, binary)
    true_ctx = {"rule": head_rule, "score": score, "layer_rules": {}}
    weights = _backward_layers(head_tape, seed, true_ctx).mean(axis=(1, 2))
    heat = np.maximum(np.einsum("bhwc,bc->bhw", activation, weights), 0.0)
    heat = resize_bilinear(heat, x.shape[1:3])
    peak = heat.max(axis=(1, 2), keepdims=True)
    heat = np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0)
    guided, _ = saliency(spec, x, rule=rule, score=score, class_index=classes,
                         smooth_activations=smooth_activations)
    return heat, guided * heat[..., None], classes
