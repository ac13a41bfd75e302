"""TF Serving's warm-up file: the export's first real request should not pay the graph optimisation.

    <export>/assets.extra/tf_serving_warmup_requests    TFRecord of tensorflow.serving.PredictionLog

TF Serving replays these requests when it loads a version, before it marks the version available
(tensorflow_serving/servables/tensorflow/saved_model_warmup.cc); a request that fails there makes
the load fail, so only requests known to be valid are written: one per explainable signature at
batch 1 (`serving_default` or the converted key, `explain_class` with class 0, and with
--image_bytes_signature `serving_bytes` and `explain_class_bytes` with a PNG of the model's input
size). The other source signatures the export keeps are not warmed: their valid inputs are unknown.

Writing needs tensorflow-serving-api's protos (the optional extra `serving`); without it the export
has no warm-up file and the report says how to get one. `verify` parses the file and runs each
request (gbp_rewrite.deploy.clean_process).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from gbp_rewrite import self_check
from gbp_rewrite.conventions import WARMUP_PATH
from gbp_rewrite.serving.serving_signatures import EXPLAIN_CLASS_BYTES, IMAGE_BYTES, SERVING_BYTES, ServingPlan
from gbp_rewrite.signatures import CLASS_INDEX, EXPLAIN_CLASS_SIGNATURE, ExplainPlan

log = logging.getLogger(__name__)

WARMUP_FILE = Path(WARMUP_PATH)
EXTRA_HINT = "pip install -e '.[serving]' (tensorflow-serving-api)"


def requests(plan: ExplainPlan, serving: ServingPlan) -> dict[str, dict[str, np.ndarray]]:
    """Signature key -> its batch-1 inputs."""
    pixels = self_check.probe_inputs(plan.inputs, batch=1)
    first_class = np.zeros([1], np.int64)
    result = {plan.signature_key: pixels, EXPLAIN_CLASS_SIGNATURE: {**pixels, CLASS_INDEX: first_class}}
    if serving.options.image_bytes:
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (serving.spec.height, serving.spec.width, 3), dtype=np.uint8)
        encoded = np.array([tf.io.encode_png(image).numpy()], dtype=object)
        result[SERVING_BYTES] = {IMAGE_BYTES: encoded}
        result[EXPLAIN_CLASS_BYTES] = {IMAGE_BYTES: encoded, CLASS_INDEX: first_class}
    return result


def write(export_dir: Path, plan: ExplainPlan, serving: ServingPlan) -> str:
    """Write the warm-up file into the export; return the report's line about it."""
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    except ImportError:
        return f"no warm-up file: writing it needs the optional extra 'serving': {EXTRA_HINT}"
    path = Path(export_dir) / WARMUP_FILE
    path.parent.mkdir(exist_ok=True)
    wanted = requests(plan, serving)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs in wanted.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(record.SerializeToString())
    log.info("wrote %s: %d warm-up requests", path, len(wanted))
    return f"{WARMUP_FILE}: {len(wanted)} requests at batch 1 ({', '.join(wanted)})"
