"""A test double of TF Serving: PredictionService/Predict over gRPC and :predict over REST.

NOT a model server for production (use the tensorflow/serving binary, which loads the export with
the same C++ loader `verify` runs). It exists so the tests, and tools/serving_table.py, can send
real gRPC and HTTP requests: it runs one export with tf.saved_model.load, in-process, on
127.0.0.1 only, on ephemeral ports, and answers like TF Serving does:

    gRPC   the service from tensorflow-serving-api's prediction_service_pb2_grpc; a bad request is
           INVALID_ARGUMENT (unknown signature or input, wrong dtype, an op error such as an
           undecodable image), an unknown model NOT_FOUND
    REST   POST /v1/models/NAME[/versions/N]:predict, parsed and written by tests/tf_serving_json.py
           (an independent model of TF Serving's json_tensor.cc); errors are {"error": ...} with
           HTTP 400 (404 for an unknown model)
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import re
import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import tf_serving_json

HOST = "127.0.0.1"
_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
_MAX_MESSAGE = 256 * 1024 * 1024


class BadRequest(Exception):
    """What TF Serving answers as INVALID_ARGUMENT (HTTP 400)."""


class UnknownModel(Exception):
    """NOT_FOUND (HTTP 404)."""


class StandIn:
    """with StandIn(export_dir, model_name="m") as server: server.grpc_address, server.rest_address"""

    def __init__(self, export_dir, *, model_name: str):
        self.model_name = model_name
        self.loaded = tf.saved_model.load(str(export_dir))
        self._lock = threading.Lock()
        self._grpc = self._http = None
        self.grpc_address = self.rest_address = None

    # -- running a signature, shared by both front ends ------------------------------------

    def run(self, model_name: str, signature: str, inputs: dict[str, np.ndarray],
            output_filter=()) -> dict[str, np.ndarray]:
        if model_name != self.model_name:
            raise UnknownModel(f"Servable not found for request: Latest({model_name})")
        signature = signature or "serving_default"
        if signature not in self.loaded.signatures:
            raise BadRequest(f"Serving signature key \"{signature}\" not found.")
        function = self.loaded.signatures[signature]
        specs = function.structured_input_signature[1]
        if set(inputs) != set(specs):
            raise BadRequest(f"input keys {sorted(inputs)} do not match the signature's {sorted(specs)}")
        tensors = {}
        for key, value in inputs.items():
            if tf.as_dtype(value.dtype if value.dtype != object else tf.string) != specs[key].dtype:
                raise BadRequest(f"Expects arg[{key}] to be {specs[key].dtype.name} but "
                                 f"{tf.as_dtype(value.dtype if value.dtype != object else tf.string).name} is provided")
            tensors[key] = tf.constant(value, dtype=specs[key].dtype)
        try:
            with self._lock:  # one request at a time: the tests measure, not load-test
                outputs = function(**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise BadRequest(_message(e)) from None
        unknown = sorted(set(output_filter) - set(outputs))
        if unknown:
            raise BadRequest(f"output tensor alias not found in signature: {unknown[0]} Outputs expected to be "
                             f"in the set {{{','.join(sorted(outputs))}}}.")
        keep = set(output_filter) or set(outputs)
        return {key: value.numpy() for key, value in outputs.items() if key in keep}

    def input_dtypes(self, signature: str) -> dict[str, np.dtype]:
        signature = signature or "serving_default"
        if signature not in self.loaded.signatures:
            raise BadRequest(f"Serving signature key \"{signature}\" not found.")
        specs = self.loaded.signatures[signature].structured_input_signature[1]
        return {k: (np.dtype(object) if s.dtype == tf.string else np.dtype(s.dtype.as_numpy_dtype))
                for k, s in specs.items()}

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> "StandIn":
        self._grpc = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2),
                                 options=[("grpc.max_send_message_length", _MAX_MESSAGE),
                                          ("grpc.max_receive_message_length", _MAX_MESSAGE)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Servicer(self), self._grpc)
        port = self._grpc.add_insecure_port(f"{HOST}:0")
        self._grpc.start()
        self.grpc_address = f"{HOST}:{port}"
        self._http = http.server.ThreadingHTTPServer((HOST, 0), _rest_handler(self))
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self.rest_address = f"{HOST}:{self._http.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()


def _message(error: Exception) -> str:
    text = getattr(error, "message", None) or str(error)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith(("Graph execution error", "Detected at node", "[[", "<stack traces"))]
    return lines[0] if lines else type(error).__name__


class _Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, stand_in: StandIn):
        self.stand_in = stand_in

    def Predict(self, request, context):  # noqa: N802 - the service's method name
        try:
            inputs = {key: tf.make_ndarray(tensor) for key, tensor in request.inputs.items()}
            outputs = self.stand_in.run(request.model_spec.name, request.model_spec.signature_name, inputs,
                                        list(request.output_filter))
        except UnknownModel as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


def _rest_handler(stand_in: StandIn):
    class Handler(http.server.BaseHTTPRequestHandler):
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
        # the client's delayed ACK add about 40 ms to every answer.
        disable_nagle_algorithm = True
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - http.server's method name
            match = _PATH.match(self.path)
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length).decode("utf-8")
            if not match:
                return self._answer(404, json.dumps({"error": f"Malformed request: POST {self.path}"}))
            try:
                signature = json.loads(body).get("signature_name") if body.strip().startswith("{") else None
                name, inputs, form = tf_serving_json.parse_predict_request(body, stand_in.input_dtypes(signature))
                outputs = stand_in.run(match.group(1), name, inputs)
                text = (tf_serving_json.row_format_response(outputs) if form == "row"
                        else tf_serving_json.columnar_response(outputs))
            except UnknownModel as e:
                return self._answer(404, json.dumps({"error": str(e)}))
            except (BadRequest, tf_serving_json.JsonTensorError, ValueError) as e:
                return self._answer(400, json.dumps({"error": str(e)}))
            return self._answer(200, text)

        def _answer(self, status: int, text: str) -> None:
            data = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet
            pass

    return Handler
