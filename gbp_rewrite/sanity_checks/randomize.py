"""Cascading model parameter randomisation: re-initialise weights from the output layer down.

Each layer's weights are drawn again from the layer's own initializers (`kernel_initializer`,
`bias_initializer`, `gamma_initializer`, ...: what the layer was built with), seeded with a fixed
seed per layer, so a run is reproducible. Layers are the leaf layers with weights, nested models
looked into, in the model's own order (input to output); the cascade takes them in reverse.
"""

from __future__ import annotations

from typing import Any

import keras

from gbp_rewrite import tf_internals
from gbp_rewrite.errors import SourceModelError

# Weight name -> initializer attributes to try (DepthwiseConv2D names its kernel 'kernel' but
# keeps its initializer as `depthwise_initializer`).
_INITIALIZER_ATTRS = {"kernel": ("kernel_initializer", "depthwise_initializer")}


def weighted_layers(model) -> list[Any]:
    """The leaf layers that hold weights, input to output, nested models looked into, once each."""
    found: list[Any] = []
    seen: set[int] = set()

    def visit(container):
        for layer in container.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if _is_model(layer):
                visit(layer)
            elif layer.weights:
                found.append(layer)

    visit(model)
    return found


def _is_model(layer) -> bool:
    return isinstance(layer, (tf_internals.keras_api().Functional, keras.Sequential))


def reinitialize(layer, *, seed: int) -> list[str]:
    """Draw each of `layer`'s weights again from its initializer; return the weights' names."""
    names = []
    for index, variable in enumerate(layer.weights):
        name = variable.name.split("/")[-1]
        initializer = _initializer(layer, name)
        if initializer is None:
            raise SourceModelError(
                f"layer '{layer.name}' ({type(layer).__name__}) has weight {name!r} without an "
                "initializer attribute to randomise it with; sanity handles Keras' built-in layers"
            )
        config = initializer.get_config()
        if "seed" in config:
            initializer = type(initializer).from_config({**config, "seed": seed * 1000 + index})
        variable.assign(keras.ops.cast(initializer(tuple(variable.shape), dtype=variable.dtype), variable.dtype))
        names.append(name)
    return names


def _initializer(layer, weight_name: str):
    for attr in _INITIALIZER_ATTRS.get(weight_name, ()) + (f"{weight_name}_initializer",):
        value = getattr(layer, attr, None)
        if value is not None:
            return keras.initializers.get(value)
    return None
