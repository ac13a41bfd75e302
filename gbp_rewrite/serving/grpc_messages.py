"""TF Serving's gRPC messages: PredictRequest from arrays, PredictResponse back to arrays.

The protos are tensorflow-serving-api's (tensorflow_serving/apis/predict.proto), the optional
extra `serving`; the tensors are TensorFlow's TensorProto, converted with tf.make_tensor_proto and
tf.make_ndarray. A request file is the serialised PredictRequest (what `request --grpc` writes
and what a gRPC client sends to PredictionService/Predict); a response file the serialised
PredictResponse.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from gbp_rewrite.errors import OptionError, OutputError, RestFormatError

EXTRA_HINT = "pip install -e '.[serving]' (tensorflow-serving-api)"


def apis():
    """tensorflow_serving.apis' (predict_pb2, prediction_service_pb2_grpc), or a one-line error."""
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError:
        raise OptionError(f"gRPC needs the optional extra 'serving': {EXTRA_HINT}") from None
    return predict_pb2, prediction_service_pb2_grpc


def predict_request(inputs: Mapping[str, np.ndarray], *, model_name: str, signature_name: str):
    """A PredictRequest for the batched `inputs` (bytes/object arrays become DT_STRING)."""
    import tensorflow as tf

    predict_pb2, _ = apis()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
    return request


def decode_predict_response(response) -> dict[str, np.ndarray]:
    """{output key: array} of a PredictResponse (the message or its serialised bytes).

    Strings come back as numpy object arrays of bytes (a PNG per example for saliency_png)."""
    import tensorflow as tf

    predict_pb2, _ = apis()
    if isinstance(response, (bytes, bytearray)):
        message = predict_pb2.PredictResponse()
        try:
            message.ParseFromString(bytes(response))
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise RestFormatError(f"not a serialised PredictResponse: {e}") from None
        response = message
    if not response.outputs:
        raise RestFormatError("the PredictResponse has no outputs; is it a PredictResponse (not a request)?")
    return {key: tf.make_ndarray(tensor) for key, tensor in sorted(response.outputs.items())}


def read_predict_response(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RestFormatError(f"cannot read the response '{path}': {e.strerror}") from None
    return decode_predict_response(data)


def write_message(message, out: str | os.PathLike) -> Path:
    """Write a serialised message to `out` (a temporary sibling renamed into place)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(message.SerializeToString())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write '{out}': {e.strerror}") from None
    return out
