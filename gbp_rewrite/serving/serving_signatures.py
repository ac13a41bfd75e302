"""Signatures for production serving: image bytes in, compact saliency maps out.

With `image_bytes=True` the export gains two signatures that take encoded images, so a client
sends a JPEG or PNG (TF Serving's `{"b64": ...}` in JSON, a DT_STRING tensor over gRPC) instead
of a float array:

    serving_bytes        image_bytes string [batch]                      -> the explained
    explain_class_bytes  image_bytes string [batch] + class_index int64 [batch]   signature's
                         outputs, plus image_size int32 [batch, 2] (each image's own height, width)

Each image is decoded, made RGB, resized and preprocessed inside the graph by the same functions
`explain` and `request` use (gbp_rewrite.pictures.images.decode and model_pixels), then goes through the
explainable signature itself, so the saliency is with respect to the model's input (the resized,
preprocessed tensor); `image_size` lets a client map it back onto its image. Images of different
sizes can share a batch (grey images are repeated to RGB, alpha is dropped). Only core TensorFlow
ops (DecodeImage, ScaleAndTranslate for the antialiased resize, a While loop):
TF Serving runs them without Python.

Compact outputs (every explainable signature, float and bytes alike):

    saliency_map_dtype='uint8'  saliency_map as uint8 [batch, H, W]: round(255 * the float map),
                                the float map being max |saliency| over channels / its per-example max
    saliency_png=True           saliency_png_bytes string [batch]: the heat map as a PNG, the picture
                                `explain` writes as <name>_heatmap.png at the input's size (explain
                                enlarges it by a whole factor below 224 px; render.saliency_heat with its
                                99.5th-percentile white point, render.colormap 'inferno'), encoded
                                in the graph with EncodePng (the `_bytes` suffix makes TF Serving's
                                REST API send it as {"b64": ...})
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import tensorflow as tf

from gbp_rewrite.conventions import EXPLAIN_CLASS_BYTES, IMAGE_BYTES, IMAGE_SIZE, SERVING_BYTES
from gbp_rewrite.errors import OptionError, SignatureError
from gbp_rewrite.pictures import images, render
from gbp_rewrite.signatures import EXPLAIN_CLASS_SIGNATURE, SALIENCY_MAP, ExplainPlan

# TF Serving's REST API writes a string output as {"b64": ...} only when its name ends in "_bytes"
# (json_tensor.cc), else as raw text, which a PNG is not: hence the suffix.
SALIENCY_PNG = "saliency_png_bytes"
MAP_DTYPES = ("float32", "uint8")

# The heat map picture's settings: render.render_all's defaults, so saliency_png is explain's heatmap.
PNG_COLORMAP = "inferno"
PNG_CLIP_PERCENTILE = 99.5

Signatures = Mapping[str, tf.types.experimental.ConcreteFunction]


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """What the user asked for (convert's keyword options), checked."""

    image_bytes: bool = False
    preprocess: str = "unit"
    saliency_map_dtype: str = "float32"
    saliency_png: bool = False

    @property
    def needs_map(self) -> bool:
        """Compact outputs were asked for: they are forms of saliency_map, which they turn on."""
        return self.saliency_map_dtype != "float32" or self.saliency_png

    def to_dict(self) -> dict:
        """The report's record (empty when nothing was asked, so old reports read the same)."""
        if not (self.image_bytes or self.needs_map):
            return {}
        record = {}
        if self.image_bytes:
            record.update({"image_bytes_signatures": [SERVING_BYTES, EXPLAIN_CLASS_BYTES],
                           "image_bytes_input": IMAGE_BYTES, "image_size_output": IMAGE_SIZE,
                           "preprocess": self.preprocess,
                           "preprocess_formula": images.PREPROCESSING[self.preprocess]})
        record["saliency_map_dtype"] = self.saliency_map_dtype
        record["saliency_png"] = self.saliency_png
        return record


def check_options(*, image_bytes: bool = False, preprocess: str = "unit",
                  saliency_map_dtype: str | None = None, saliency_png: bool = False) -> ServingOptions:
    """Check convert's serving options before anything is loaded; raise OptionError."""
    images.check_preprocess(preprocess)
    dtype = saliency_map_dtype or "float32"
    if dtype not in MAP_DTYPES:
        raise OptionError(f"unknown saliency_map_dtype {saliency_map_dtype!r}; valid dtypes: {', '.join(MAP_DTYPES)}")
    return ServingOptions(bool(image_bytes), preprocess, dtype, bool(saliency_png))


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    """The options, checked against the explainable signature they apply to."""

    options: ServingOptions
    input_key: str | None = None  # the image input the bytes feed
    spec: images.InputSpec | None = None
    png_outputs: dict[str, str] = dataclasses.field(default_factory=dict)  # png key -> saliency key

    def output_keys(self, plan: ExplainPlan) -> list[str]:
        """The float signatures' outputs (the bytes signatures add IMAGE_SIZE)."""
        return plan.output_keys() + list(self.png_outputs)

    def signature_outputs(self, plan: ExplainPlan) -> dict[str, list[str]]:
        """Signature key -> output keys, for the report."""
        keys = self.output_keys(plan)
        layout = {plan.signature_key: keys, EXPLAIN_CLASS_SIGNATURE: keys}
        if self.options.image_bytes:
            layout.update({SERVING_BYTES: keys + [IMAGE_SIZE], EXPLAIN_CLASS_BYTES: keys + [IMAGE_SIZE]})
        return layout


def make_serving_plan(plan: ExplainPlan, options: ServingOptions) -> ServingPlan:
    """Check that the signature can take image bytes / give compact maps; raise SignatureError."""
    taken = set(plan.outputs) | set(plan.inputs)
    png_outputs = {}
    if options.saliency_png:
        png_outputs = {f"saliency_png{m[len(SALIENCY_MAP):]}_bytes": s for m, s in plan.saliency_maps.items()}
    input_key = spec = None
    if options.image_bytes:
        input_key, spec = _image_input(plan)
        if plan.signature_key in (SERVING_BYTES, EXPLAIN_CLASS_BYTES):
            raise SignatureError(f"signature {plan.signature_key!r} is a name the image-bytes signatures "
                                 "take; is the source already an explainable export?")
    clashes = sorted(taken & (set(png_outputs) | ({IMAGE_SIZE} if options.image_bytes else set())))
    if clashes:
        raise SignatureError(f"signature {plan.signature_key!r} already uses the name(s) {', '.join(clashes)}, "
                             "which the serving outputs add; rename them in the source model")
    return ServingPlan(options, input_key, spec, png_outputs)


def check_kept_signatures(kept: Mapping[str, object], options: ServingOptions) -> None:
    """The source's other signatures (kept in the export) must not take the bytes signatures' names."""
    taken = sorted({SERVING_BYTES, EXPLAIN_CLASS_BYTES} & set(kept)) if options.image_bytes else []
    if taken:
        raise SignatureError(f"the source already has a signature named {taken[0]!r}, which "
                             "--image_bytes_signature adds; is it already an explainable export?")


def _image_input(plan: ExplainPlan) -> tuple[str, images.InputSpec]:
    if len(plan.inputs) != 1:
        raise SignatureError(
            f"--image_bytes_signature needs a signature with one image input; {plan.signature_key!r} takes "
            f"{len(plan.inputs)} ({', '.join(plan.inputs)}); convert without --image_bytes_signature")
    (key, desc), = plan.inputs.items()
    spec = images.rgb_input_spec(desc.shape, desc.dtype)
    if isinstance(spec, str):
        raise SignatureError(
            f"--image_bytes_signature needs a float [batch, height, width, 3] input with a fixed height and "
            f"width (images are resized to it), but signature {plan.signature_key!r} takes {desc.describe()} "
            f"({spec}); convert without --image_bytes_signature")
    return key, spec


# ---------------------------------------------------------------------------------------------
# Graph construction


def add_signatures(signatures: Signatures, plan: ExplainPlan, serving: ServingPlan) -> dict:
    """The explainable signatures with the serving options applied (unchanged when none were asked).

    The compact outputs wrap each signature; the bytes signatures call the (wrapped) float ones,
    so every signature shares the one traced explainable core.
    """
    result = dict(signatures)
    if serving.options.needs_map:
        for key in (plan.signature_key, EXPLAIN_CLASS_SIGNATURE):
            result[key] = _with_compact_outputs(result[key], plan, serving)
    if serving.options.image_bytes:
        result[SERVING_BYTES] = _bytes_signature(result[plan.signature_key], serving)
        result[EXPLAIN_CLASS_BYTES] = _bytes_signature(result[EXPLAIN_CLASS_SIGNATURE], serving)
    return result


def _input_specs(function) -> dict[str, tf.TensorSpec]:
    return dict(function.structured_input_signature[1])


def _with_compact_outputs(function, plan: ExplainPlan, serving: ServingPlan):
    uint8 = serving.options.saliency_map_dtype == "uint8"

    @tf.function(autograph=False)
    def compact(**inputs):
        outputs = dict(function(**inputs))
        for png_key, saliency_key in serving.png_outputs.items():
            outputs[png_key] = heat_png(outputs[saliency_key])
        if uint8:
            for map_key in plan.saliency_maps:
                outputs[map_key] = map_to_uint8(outputs[map_key])
        return outputs

    return compact.get_concrete_function(**_input_specs(function))


def _bytes_signature(function, serving: ServingPlan):
    others = {k: s for k, s in _input_specs(function).items() if k != serving.input_key}

    @tf.function(autograph=False)
    def from_bytes(**inputs):
        pixels, sizes = decode_batch(inputs.pop(IMAGE_BYTES), spec=serving.spec, mode=serving.options.preprocess)
        outputs = dict(function(**{serving.input_key: pixels}, **inputs))
        outputs[IMAGE_SIZE] = sizes
        return outputs

    return from_bytes.get_concrete_function(**{IMAGE_BYTES: tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)},
                                            **others)


def decode_batch(encoded: tf.Tensor, *, spec: images.InputSpec, mode: str) -> tuple[tf.Tensor, tf.Tensor]:
    """string [batch] -> (model input [batch, H, W, 3], image_size int32 [batch, 2]).

    One image at a time (tf.map_fn): the images may differ in size until they are resized. A
    string that is not a PNG, JPEG, BMP or GIF fails the request with DecodeImage's message
    ("Unknown image file format. One of JPEG, PNG, GIF, BMP required."), which TF Serving returns
    as INVALID_ARGUMENT.
    """

    def one(data):
        image = images.decode(data)
        return images.model_pixels(image, spec=spec, mode=mode), tf.shape(image, out_type=tf.int32)[:2]

    signature = (tf.TensorSpec([spec.height, spec.width, 3], spec.dtype), tf.TensorSpec([2], tf.int32))
    pixels, sizes = tf.map_fn(one, encoded, fn_output_signature=signature)
    return tf.ensure_shape(pixels, [None, spec.height, spec.width, 3]), sizes


def map_to_uint8(saliency_map: tf.Tensor) -> tf.Tensor:
    """A [0, 1] float map -> uint8 0..255 (round half to even; 1 -> 255, 0 -> 0)."""
    return tf.cast(tf.round(tf.clip_by_value(saliency_map, 0.0, 1.0) * 255.0), tf.uint8)


def heat_png(saliency: tf.Tensor) -> tf.Tensor:
    """[batch, H, W, C] saliency -> string [batch]: each example's heat map picture as a PNG.

    The numbers are render.colormap(render.saliency_heat(s)) computed in the graph: the largest
    |s| over channels in float64, divided by its 99.5th percentile (numpy's linear method; the
    maximum when that is 0), clipped to [0, 1], rounded to float32, looked up in render's table.
    """
    magnitude = tf.reduce_max(tf.abs(tf.cast(saliency, tf.float64)), axis=-1)  # [b, H, W]
    flat = tf.reshape(magnitude, [tf.shape(magnitude)[0], -1])
    white = _percentile(flat, PNG_CLIP_PERCENTILE)
    peak = tf.reduce_max(flat, axis=1)
    white = tf.where(white > 0.0, white, peak)[:, None, None]
    heat = tf.cast(tf.clip_by_value(tf.math.divide_no_nan(magnitude, white), 0.0, 1.0), tf.float32)
    table = tf.constant(render.lookup_table(PNG_COLORMAP))
    steps = table.shape[0] - 1
    index = tf.cast(tf.round(tf.cast(heat, tf.float64) * steps), tf.int32)
    pictures = tf.gather(table, index)  # [b, H, W, 3] uint8
    return tf.map_fn(tf.io.encode_png, pictures, fn_output_signature=tf.TensorSpec([], tf.string))


def _percentile(values: tf.Tensor, percent: float) -> tf.Tensor:
    """numpy.percentile(values, percent, axis=1) (method 'linear') for [batch, n] float64.

    numpy's own arithmetic, step by step in float64: virtual index (n - 1) * q, its floor and the
    next index (capped at n - 1), weight t = index - floor, and _lerp: a + (b - a) * t, or
    b - (b - a) * (1 - t) from t = 0.5 on.
    """
    quantile = tf.constant(np.true_divide(np.float64(percent), 100), tf.float64)
    count = tf.shape(values, out_type=tf.int64)[1]
    virtual = tf.cast(count - 1, tf.float64) * quantile
    below = tf.cast(tf.floor(virtual), tf.int64)
    above = tf.minimum(below + 1, count - 1)
    gamma = virtual - tf.cast(below, tf.float64)
    ordered = tf.sort(values, axis=1)
    a, b = tf.gather(ordered, below, axis=1), tf.gather(ordered, above, axis=1)
    difference = b - a
    return tf.where(gamma >= 0.5, b - difference * (1.0 - gamma), a + difference * gamma)
