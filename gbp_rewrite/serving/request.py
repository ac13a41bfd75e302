"""Image files -> the body of a TF Serving REST predict request for an exported signature.

The images go through exactly the pipeline `explain` uses (gbp_rewrite.pictures.images: decode, RGB,
bilinear resize to the signature's height and width, the same preprocessing modes), so what the
model server answers is what `explain` would have computed for the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from gbp_rewrite.pictures import images
from gbp_rewrite import write
from gbp_rewrite.serving import rest
from gbp_rewrite.graph import savedmodel
from gbp_rewrite.conventions import CLASS_INDEX, EXPLAIN_CLASS_SIGNATURE, some_names
from gbp_rewrite.errors import ImageError, OutputError, SignatureError

_BATCH = 32


def make_request(
    model: str | os.PathLike,
    image_paths: Sequence[str | os.PathLike],
    *,
    signature: str | None = None,
    class_index: int | None = None,
    preprocess: str = "unit",
    grayscale_to_rgb: bool = False,
) -> dict[str, Any]:
    """The row-format request body {"signature_name", "instances": [{input: pixels}, ...]}.

    With `class_index`, the body calls the `explain_class` signature of an explainable export:
    every instance also carries "class_index": N, and the response explains class N.

    Args:
      model: the SavedModel the request is for (its signature gives the input name and size); a
        TF Serving base path means its highest version, as the server would serve.
      image_paths: image files (PNG, JPEG, BMP, GIF), one instance each, in this order.
      signature: the signature to call (default: serving_default, or explain_class with
        `class_index`); it must take one float [batch, height, width, 3] input (besides
        class_index).
      class_index: the class to explain in every image (the explain_class signature).
      preprocess: 'unit' (x/255, default), 'symmetric' (x/127.5 - 1), 'caffe' (BGR minus the
        ImageNet means) or 'none' (0..255), as for `explain`.
      grayscale_to_rgb: send grey-scale images as RGB (otherwise they are refused).
    """
    signature = request_signature(signature, class_index)
    inputs = make_inputs(model, image_paths, signature=signature, class_index=class_index,
                         preprocess=preprocess, grayscale_to_rgb=grayscale_to_rgb)
    return rest.request_body(inputs, signature_name=signature)


def request_signature(signature: str | None, class_index: int | None) -> str:
    """The signature a request calls: the one given, else explain_class with a class, else serving_default."""
    return signature or (EXPLAIN_CLASS_SIGNATURE if class_index is not None else "serving_default")


def make_inputs(
    model: str | os.PathLike,
    image_paths: Sequence[str | os.PathLike],
    *,
    signature: str = "serving_default",
    class_index: int | None = None,
    preprocess: str = "unit",
    grayscale_to_rgb: bool = False,
) -> dict[str, np.ndarray]:
    """{input key: batch} for the images: pixels for a float image input, or, for an image-bytes
    signature (`serving_bytes`, `explain_class_bytes`: one string input), the files' own bytes,
    each checked to decode (the model decodes, resizes and preprocesses them itself)."""
    images.check_preprocess(preprocess)
    paths = [str(p) for p in image_paths]
    if not paths:
        raise ImageError("no image files given; pass at least one --image")
    saved = savedmodel.read(write.resolve_served_version(model, command="request"))
    bytes_key = image_bytes_input(saved, signature)
    if bytes_key is not None and class_index is None:
        return {bytes_key: encoded_images(paths)}
    takes_class = class_index is not None
    if takes_class:
        _check_class_input(saved, signature, class_index)
    key, spec = image_input(saved, signature, besides=(CLASS_INDEX,) if takes_class else ())
    inputs = {key: load_pixels(paths, spec=spec, preprocess=preprocess, grayscale_to_rgb=grayscale_to_rgb)}
    if takes_class:
        inputs[CLASS_INDEX] = np.full([len(paths)], class_index, np.int64)
    return inputs


def image_bytes_input(model: savedmodel.SavedModelFile, signature: str) -> str | None:
    """The key of the signature's encoded-image input when its one input is a string tensor."""
    desc = model.signature(signature)
    (key, tensor), *others = desc.inputs.items() or [(None, None)]
    return key if not others and tensor is not None and tensor.dtype == tf.string else None


def encoded_images(paths: Sequence[str]) -> np.ndarray:
    """The files' bytes as a string batch; a file TensorFlow cannot decode is an ImageError."""
    encoded = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
            images.decode(data)
        except (OSError, tf.errors.OpError):
            raise ImageError(f"'{path}': {images.diagnose(path)}") from None
        encoded.append(data)
    return np.array(encoded, dtype=object)


def _check_class_input(model: savedmodel.SavedModelFile, signature: str, class_index: int) -> None:
    """--class needs a signature that takes class_index: an explainable export's explain_class."""
    if signature not in model.signature_keys() and signature == EXPLAIN_CLASS_SIGNATURE:
        raise SignatureError(
            f"the model in '{model.path}' has no {EXPLAIN_CLASS_SIGNATURE!r} signature, so --class "
            f"{class_index} cannot be asked for; convert it first (gbp-rewrite convert SRC DST)"
        )
    if CLASS_INDEX not in model.signature(signature).inputs:
        raise SignatureError(
            f"signature {signature!r} takes no {CLASS_INDEX!r} input, so --class {class_index} cannot be "
            f"asked for; use --signature {EXPLAIN_CLASS_SIGNATURE} (the default with --class)"
        )


def image_input(model: savedmodel.SavedModelFile, signature: str, *,
                besides: Sequence[str] = ()) -> tuple[str, images.InputSpec]:
    """The signature's one input (not counting `besides`), which must be float [batch, height,
    width, 3] with a fixed size."""
    desc = model.signature(signature)
    others = {k: v for k, v in desc.inputs.items() if k not in besides}
    if len(others) != 1:
        raise SignatureError(
            f"signature {signature!r} takes {len(desc.inputs)} inputs ({some_names(desc.inputs)}); `request` "
            "fills one image input (build other bodies with gbp_rewrite.serving.rest.request_body)"
        )
    (key, tensor), = others.items()
    spec = images.require_rgb_input(tensor.shape, tensor.dtype, refusals={
        images.NOT_RGB_INPUT: SignatureError(
            f"signature {signature!r} takes {tensor.describe()}; `request` sends RGB images to a float "
            "[batch, height, width, 3] input"),
        images.NO_FIXED_SIZE: SignatureError(
            f"signature {signature!r} takes {tensor.describe()}, with no fixed height and width; "
            "`request` resizes images to the signature's size, so it needs a fixed one"),
    })
    return key, spec


def load_pixels(paths: Sequence[str], *, spec: images.InputSpec, preprocess: str,
                grayscale_to_rgb: bool) -> np.ndarray:
    """[len(paths), H, W, 3] model input; any file that cannot be used is an ImageError."""
    rows: dict[int, np.ndarray] = {}
    for batch in images.dataset(paths, spec=spec, mode=preprocess, batch_size=_BATCH):
        for index, channels, pixels in zip(batch["index"].numpy(), batch["channels"].numpy(),
                                           batch["pixels"].numpy()):
            problem = images.channel_problem(int(channels), grayscale_to_rgb=grayscale_to_rgb)
            if problem:
                raise ImageError(f"'{paths[index]}' is {problem}")
            rows[int(index)] = pixels
    for index, path in enumerate(paths):
        if index not in rows:  # dropped by the input pipeline: say why
            raise ImageError(f"'{path}': {images.diagnose(path)}")
    return np.stack([rows[i] for i in range(len(paths))])


def write_request(body: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write the body as JSON to `out` (a temporary sibling renamed into place)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(rest.dumps(body) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the request to '{out}': {e.strerror}") from None
    return out
