"""The serving signature a Keras model would get from `model.export`, and calls through it.

Keras 3's `model.export(DIR)` serves `model(inputs, training=False)` with one TensorSpec per model
input, named after the input's KerasTensor, and TensorFlow keys the outputs by the model's output
dict keys, or `output_0`, `output_1`, ... for a tensor or a list. The Keras path writes the same
layout, so a client sees the same keys whichever path converted the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import keras
import tensorflow as tf

from gbp_rewrite.errors import SignatureError
from gbp_rewrite.graph.savedmodel import TensorDesc

SIGNATURE_KEY = "serving_default"


@dataclasses.dataclass(frozen=True)
class KerasSignature:
    """Inputs and outputs by signature key, and the model's own input/output structures."""

    inputs: dict[str, TensorDesc]
    outputs: dict[str, TensorDesc]
    input_structure: Any  # KerasTensors, nested as the model takes them
    output_structure: Any  # KerasTensors, nested as the model returns them
    model_name: str

    def input_specs(self) -> dict[str, tf.TensorSpec]:
        return {key: desc.spec() for key, desc in self.inputs.items()}

    def pack_inputs(self, tensors: Mapping[str, tf.Tensor]) -> Any:
        """Signature inputs (by key) -> the structure the model is called with."""
        return keras.tree.map_structure(lambda kt: tensors[kt.name], self.input_structure)

    def unpack_outputs(self, outputs: Any) -> dict[str, tf.Tensor]:
        """The model's outputs -> signature outputs (by key)."""
        return dict(keyed_outputs(outputs))

    def call(self, model, tensors: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Run `model` (the source or its clone) in inference mode on signature inputs."""
        return self.unpack_outputs(model(self.pack_inputs(tensors), training=False))


def describe(model) -> KerasSignature:
    """The signature `model.export` would write for `model` (a built Sequential/functional model)."""
    if isinstance(model, keras.Sequential):
        (input_structure,) = model.inputs  # a Sequential model takes one tensor
        (output_structure,) = model.outputs
    else:
        input_structure, output_structure = model.input, model.output
    inputs: dict[str, TensorDesc] = {}
    for tensor in keras.tree.flatten(input_structure):
        if tensor.name in inputs:
            raise SignatureError(
                f"two inputs of model '{model.name}' are named {tensor.name!r}; give each "
                "keras.Input a distinct name"
            )
        inputs[tensor.name] = _desc(tensor.name, tensor)
    outputs = {key: _desc(key, tensor) for key, tensor in keyed_outputs(output_structure)}
    return KerasSignature(inputs, outputs, input_structure, output_structure, model.name)


def keyed_outputs(outputs: Any) -> list[tuple[str, Any]]:
    if isinstance(outputs, Mapping):
        items = [(str(k), v) for k, v in outputs.items()]
    elif isinstance(outputs, (list, tuple)):
        items = [(f"output_{i}", v) for i, v in enumerate(outputs)]
    else:
        items = [("output_0", outputs)]
    for key, value in items:
        if isinstance(value, (Mapping, list, tuple)):
            raise SignatureError(
                f"model output {key!r} is a nested structure; a serving signature needs one tensor "
                "per output (return a flat dict or list of tensors)"
            )
    return items


def _desc(key: str, tensor) -> TensorDesc:
    shape = tuple(tensor.shape)
    shape = (None, *shape[1:]) if shape else shape  # the batch is dynamic, as in model.export
    return TensorDesc(key=key, tensor_name=tensor.name, dtype=tf.as_dtype(tensor.dtype), shape=shape)


def check_signature_key(signature: str) -> None:
    if signature != SIGNATURE_KEY:
        raise SignatureError(
            f"a Keras model has one signature, {SIGNATURE_KEY!r} (its call, as "
            f"model.export serves it), not {signature!r}; leave --signature out"
        )
