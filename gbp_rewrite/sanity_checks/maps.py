"""The four maps of a Keras model, rebuilt from the model as it is now (its current weights).

    guided          guided-backpropagation saliency
    gradcam         Grad-CAM (gbp_rewrite.cam), [H, W]
    guided_gradcam  guided saliency times Grad-CAM
    gradient        the plain input gradient (the 'vanilla' rule): the control

Built with the Keras path's own machinery (a clone with the rule's activations, the explainable
signatures traced over it), exactly what `convert` exports, so the sanity check tests the maps a
user serves.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gbp_rewrite import cam as cam_maps
from gbp_rewrite import signatures
from gbp_rewrite.keras import front_end as keras_front_end

METHODS = ("guided", "gradcam", "guided_gradcam", "gradient")


def explain(model, pixels: np.ndarray, classes: np.ndarray, *, cam_layer: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({method: maps [n, H, W(, C)]}, model outputs) for `classes` (one per example)."""
    guided, outputs = _run(model, pixels, classes, rule="guided", cam_layer=cam_layer, cam=True)
    plain, _ = _run(model, pixels, classes, rule="vanilla", cam_layer=None, cam=False)
    maps = {
        "guided": guided[signatures.SALIENCY],
        "gradcam": guided[cam_maps.GRADCAM],
        "guided_gradcam": guided[cam_maps.GUIDED_GRADCAM],
        "gradient": plain[signatures.SALIENCY],
    }
    return maps, outputs


def _run(model, pixels, classes, *, rule: str, cam_layer: str | None, cam: bool):
    rewrite = keras_front_end.plan_rewrite(model, layers=None, exclude_layers=None, rule=rule, score="logit",
                                           output=None, cam=cam)
    clone = keras_front_end.clone_model(model, rewrite.replacements)
    options = keras_front_end.cam_options(clone, cam_layer) if cam else None
    explainable = signatures.build_signatures(lambda inputs: rewrite.signature.call(clone, inputs), rewrite.plan,
                                              cam=options)
    (input_key,) = rewrite.plan.saliency_outputs.values()
    function = explainable[signatures.EXPLAIN_CLASS_SIGNATURE]
    result = function(**{input_key: tf.constant(pixels), signatures.CLASS_INDEX: tf.constant(classes, tf.int64)})
    values = {key: value.numpy() for key, value in result.items()}
    return values, values[rewrite.plan.output_key]
