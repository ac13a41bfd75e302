"""Image files in, model-ready batches out: listing, decoding, resizing and preprocessing.

    paths -> tf.data: read, tf.io.decode_image, match channels, tf.image.resize, preprocess
          -> batches of {index, pixels, channels, encoded}

The pipeline streams: only a few batches are in memory at a time, however many files there are.
A file that does not decode is dropped from the stream (`ignore_errors`); its index is missing
from the batches, and `diagnose` says why (by decoding it again, eagerly, to get the message).
The encoded bytes travel with each example, so the caller can decode the image again at its
original resolution (for the overlay) without holding every original in memory.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import tensorflow as tf

from gbp_rewrite.errors import ImageError, OptionError, one_line

#: File extensions `list_folder` takes as images (what tf.io.decode_image reads, case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

# Keras applications' preprocessing modes: name -> description (the formula on 0..255 RGB input).
PREPROCESSING = {
    "unit": "x / 255 (values in [0, 1])",
    "symmetric": "x / 127.5 - 1 (values in [-1, 1])",
    "caffe": "RGB -> BGR, minus the ImageNet means (103.939, 116.779, 123.68)",
    "none": "raw 0..255 floats",
}
_CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)

_GREY_FIX = ("the model takes 3-channel RGB: convert it (e.g. with --grayscale_to_rgb, or with an "
             "image editor)")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the model takes: [batch, height, width, 3] of `dtype`."""

    height: int
    width: int
    dtype: tf.DType


#: Why an input cannot take images (what rgb_input_spec returns instead of an InputSpec).
NOT_RGB_INPUT = "not a float [batch, height, width, 3] input"
NO_FIXED_SIZE = "no fixed height and width"


def rgb_input_spec(shape: tf.TensorShape | Sequence[int | None] | None,
                   dtype: tf.DType | None) -> InputSpec | str:
    """The InputSpec of an input that takes RGB images, or why it cannot take them.

    The input must be float [batch, height, width, 3] (else NOT_RGB_INPUT) with a fixed height and
    width, the size images are resized to (else NO_FIXED_SIZE). `shape` is anything
    tf.TensorShape takes (None: unknown rank); `dtype` None is a composite (ragged, sparse) tensor.
    """
    shape = tf.TensorShape(shape)
    if shape.rank != 4 or shape[3] != 3 or dtype is None or not dtype.is_floating:
        return NOT_RGB_INPUT
    if shape[1] is None or shape[2] is None:
        return NO_FIXED_SIZE
    return InputSpec(int(shape[1]), int(shape[2]), dtype)


def require_rgb_input(shape: tf.TensorShape | Sequence[int | None] | None, dtype: tf.DType | None, *,
                      refusals: Mapping[str, Exception]) -> InputSpec:
    """rgb_input_spec's InputSpec, else the error `refusals` gives for the reason (NOT_RGB_INPUT,
    NO_FIXED_SIZE): each command words its own refusal."""
    spec = rgb_input_spec(shape, dtype)
    if isinstance(spec, str):
        raise refusals[spec]
    return spec


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file of a folder that is not an image by its extension, so it is not explained."""

    file: str
    reason: str


def list_folder(folder: str | os.PathLike, *, recursive: bool = False,
                exclude: str | os.PathLike | None = None) -> tuple[list[str], list[Skipped]]:
    """The image files of `folder` (with `recursive`, of its subfolders too), sorted by path, and
    the files skipped.

    Hidden files and folders (names starting with '.') are ignored, and so is the folder `exclude`
    (the output folder, when it lies inside: its pictures are no input); other files whose
    extension is not one of IMAGE_EXTENSIONS are returned as skipped, so the caller can name them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"--dir '{folder}' is not a folder; pass a folder of images, or the files with --image")
    excluded = Path(exclude).resolve() if exclude is not None else None
    images, skipped = [], []
    for entry in _entries(folder, recursive=recursive, excluded=excluded):
        if entry.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(str(entry))
        else:
            skipped.append(Skipped(str(entry), f"not an image file name (extensions: {', '.join(IMAGE_EXTENSIONS)})"))
    return images, skipped


def _entries(folder: Path, *, recursive: bool, excluded: Path | None) -> list[Path]:
    """The visible files of `folder` sorted by name, then (recursive) those of its subfolders."""
    files, folders = [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            files.append(entry)
        elif recursive and entry.is_dir() and not entry.is_symlink() and entry.resolve() != excluded:
            folders.append(entry)
    for sub in folders:
        files.extend(_entries(sub, recursive=True, excluded=excluded))
    return files


def check_preprocess(mode: str) -> str:
    if mode not in PREPROCESSING:
        raise OptionError(f"unknown preprocessing {mode!r}; valid modes: {', '.join(PREPROCESSING)}")
    return mode


def preprocess(pixels: tf.Tensor, mode: str) -> tf.Tensor:
    """Apply a Keras-applications preprocessing mode to float RGB values in 0..255 ([..., 3])."""
    check_preprocess(mode)
    pixels = tf.cast(pixels, tf.float32)
    if mode == "unit":
        return pixels / _unfolded(255.0)
    if mode == "symmetric":
        return pixels / _unfolded(127.5) - 1.0
    if mode == "caffe":
        return pixels[..., ::-1] - tf.constant(_CAFFE_BGR_MEANS, tf.float32)
    return pixels


def _unfolded(divisor: float) -> tf.Tensor:
    """A constant divisor Grappler cannot see as one.

    In a model's graph (the image-bytes signatures) Grappler's constant folding turns x / c into
    x * (1/c), which rounds differently from the division tf.data and numpy compute; a
    PlaceholderWithDefault is never folded, so every path divides and gets the same numbers.
    """
    return tf.compat.v1.placeholder_with_default(tf.constant(divisor, tf.float32), [])


def _decode(encoded: tf.Tensor) -> tf.Tensor:
    """Bytes -> uint8 [h, w, c] with the file's own channels (a GIF's first frame)."""
    return tf.io.decode_image(encoded, channels=0, expand_animations=False)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """[h, w, c] -> [h, w, 3]: RGB(A) keeps R, G, B; grey(+alpha) repeats the grey channel."""
    channels = tf.shape(image)[-1]
    rgb = tf.cond(channels >= 3, lambda: image[..., :3], lambda: tf.tile(image[..., :1], [1, 1, 3]))
    rgb.set_shape([None, None, 3])
    return rgb


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """Bytes -> uint8 [h, w, c] with the file's own channels (a GIF's first frame).

    Graph ops only (DecodeImage): the image-bytes signatures decode with it inside the model."""
    return _decode(encoded)


def model_pixels(image: tf.Tensor, *, spec: InputSpec, mode: str) -> tf.Tensor:
    """uint8 [h, w, c] -> the model's input [H, W, 3] of spec.dtype: RGB, resized, preprocessed.

    The one definition of "what the model sees" for `explain`, `request` and the image-bytes
    signatures (gbp_rewrite.serving.serving_signatures), so all three give the model the same numbers.
    """
    resized = tf.image.resize(tf.cast(_to_rgb(image), tf.float32), [spec.height, spec.width],
                              method="bilinear", antialias=True)
    return tf.cast(preprocess(resized, mode), spec.dtype)


def dataset(paths: Sequence[str], *, spec: InputSpec, mode: str, batch_size: int) -> tf.data.Dataset:
    """Batches of {index, pixels [b, H, W, 3] spec.dtype, channels [b], encoded [b] bytes}.

    `channels` is the file's own channel count (the caller refuses grey ones unless asked to
    convert them); files that fail to read or decode are left out of the stream.
    """
    return _decoded_batches(list(paths), tf.io.read_file, spec=spec, mode=mode, batch_size=batch_size)


def encoded_dataset(encoded: Sequence[bytes], *, spec: InputSpec, mode: str, batch_size: int) -> tf.data.Dataset:
    """`dataset` for files already read: the same batches, from each file's bytes.

    The Beam pipeline decodes through it, so its pixels are `explain`'s to the bit (the same
    tf.data graph; an eager or tf.function decode differed in the last bit, TF 2.21) and decoding
    runs in parallel instead of one eager image at a time."""
    return _decoded_batches(list(encoded), tf.identity, spec=spec, mode=mode, batch_size=batch_size)


def _decoded_batches(sources: list, read: Callable[[tf.Tensor], tf.Tensor], *, spec: InputSpec, mode: str,
                     batch_size: int) -> tf.data.Dataset:
    check_preprocess(mode)

    def load(index, source):
        encoded = read(source)
        return {"index": index, **decode_example(encoded, spec=spec, mode=mode), "encoded": encoded}

    indexed = tf.data.Dataset.from_tensor_slices((tf.range(len(sources), dtype=tf.int64), sources))
    return (
        indexed.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(1)
    )


def decode_example(encoded: tf.Tensor, *, spec: InputSpec, mode: str) -> dict[str, tf.Tensor]:
    """One file's bytes -> {pixels [H, W, 3] spec.dtype, channels}: what the model is fed.

    `dataset` maps it over files; the Beam pipeline (gbp_rewrite.beam) calls it on bytes it read."""
    image = _decode(encoded)
    return {"pixels": model_pixels(image, spec=spec, mode=mode), "channels": tf.shape(image)[-1]}


def channel_problem(channels: int, *, grayscale_to_rgb: bool) -> str | None:
    """Why an image with this many channels cannot go to an RGB model, or None if it can."""
    if channels in (3, 4):  # RGBA: the alpha channel is dropped
        return None
    if channels in (1, 2) and grayscale_to_rgb:
        return None
    if channels in (1, 2):
        kind = "grey-scale" if channels == 1 else "grey-scale with alpha"
        return f"{kind} ({channels} channel{'s' if channels > 1 else ''}); {_GREY_FIX}"
    return f"{channels} channels; the model takes 3-channel RGB"


def diagnose(path: str) -> str:
    """Why a file dropped from the stream could not be used, in one line."""
    try:
        encoded = tf.io.read_file(path)
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError, tf.errors.FailedPreconditionError) as e:
        return f"cannot read the file: {_tf_message(e)}"
    return diagnose_encoded(encoded)


def diagnose_encoded(encoded: tf.Tensor | bytes) -> str:
    """Why a file's bytes could not be used (`diagnose` after reading them), in one line."""
    if int(tf.strings.length(encoded)) == 0:
        return "empty file"
    try:
        _decode(encoded)
    except tf.errors.InvalidArgumentError as e:
        message = _tf_message(e)
        if message.startswith("Unknown image file format"):
            return "not an image (PNG, JPEG, BMP or GIF)"
        return f"corrupt or truncated image: {message}"
    return "failed in the input pipeline, though it decodes on its own; run again with --verbose"


def unique_names(names: Sequence[str]) -> list[str]:
    """`names` made distinct for use as file name stems, in order.

    The first of equal names keeps it; a later one becomes name_2, name_3, ..., skipping any
    name already given and any other name in the list (so 'x', 'x', 'x_2' -> 'x', 'x_3', 'x_2').
    """
    taken = set(names)
    used: set[str] = set()
    unique = []
    for name in names:
        candidate, n = name, 1
        while candidate in used or (candidate != name and candidate in taken):
            n += 1
            candidate = f"{name}_{n}"
        used.add(candidate)
        unique.append(candidate)
    return unique


def decode_rgb(encoded: bytes) -> tf.Tensor:
    """The image at its own resolution as uint8 [h, w, 3] (grey repeated, alpha dropped)."""
    return _to_rgb(_decode(encoded))


def _tf_message(error: tf.errors.OpError) -> str:
    """TensorFlow's message without its '{{function_node ...}}' prefix and '[Op:...]' suffix."""
    text = one_line(error)
    text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\].*$", "", text)
    return text.strip() or type(error).__name__
