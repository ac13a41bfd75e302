"""A small client for a model server (TF Serving): send a predict request, get arrays back.

    client = Client("localhost:8501", model_name="shapes")                    # REST
    client = Client("localhost:8500", model_name="shapes", protocol="grpc")   # gRPC
    outputs = client.explain_images(["cat.jpg"])         # the serving_bytes signature
    outputs = client.predict({"image": pixels}, signature="serving_default")

REST posts TF Serving's row format to http://ADDRESS/v1/models/NAME[/versions/N]:predict (strings
as {"b64": ...}) with the standard library; gRPC calls PredictionService/Predict with
tensorflow-serving-api (the optional extra `serving`). Either way the result is {output: array}
(gRPC keeps the server's dtypes; REST's JSON gives float32 and int64, strings as bytes), and a
request the server refuses is a ServingError carrying the server's own message.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Mapping, Sequence

import numpy as np

from gbp_rewrite.serving import rest
from gbp_rewrite.errors import OptionError, RestFormatError, ServingError

PROTOCOLS = ("rest", "grpc")
DEFAULT_TIMEOUT = 60.0
# gRPC's default 4 MiB message limit is too small for float saliency of a batch of large images.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class Client:
    """Send predict requests to one model on a server at `address` ("host:port")."""

    def __init__(self, address: str, *, model_name: str, protocol: str = "rest", version: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        if protocol not in PROTOCOLS:
            raise OptionError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
        if not address or "/" in address:
            raise OptionError(f"address {address!r} must be host:port (e.g. localhost:8501), without a scheme or path")
        self.address, self.model_name, self.protocol = address, model_name, protocol
        self.version, self.timeout = version, float(timeout)
        self._channel = self._stub = None
        self.last_request_bytes = self.last_response_bytes = 0  # on the wire, for measurements

    # -- public ---------------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, np.ndarray], *, signature: str = "serving_default",
                outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run `signature` on the batched `inputs` ({input key: array}); return {output key: array}.

        `outputs`: only these outputs. Over gRPC the server computes and sends only them
        (PredictRequest.output_filter); TF Serving's REST API always sends every output, so over
        REST they are picked from the answer (no bytes saved).
        """
        if self.protocol == "grpc":
            return self._predict_grpc(inputs, signature, outputs)
        answer = self._predict_rest(inputs, signature)
        if outputs is None:
            return answer
        missing = sorted(set(outputs) - set(answer))
        if missing:
            raise ServingError(f"the answer has no output {missing[0]!r}; its outputs: {', '.join(sorted(answer))}")
        return {key: answer[key] for key in outputs}

    def explain_images(self, images: Sequence[bytes | str | os.PathLike], *, signature: str = "serving_bytes",
                       class_index: Sequence[int] | None = None,
                       outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Explain encoded images (bytes, or paths of JPEG/PNG/BMP/GIF files) with an image-bytes
        signature (`--image_bytes_signature`); `class_index` calls `explain_class_bytes`."""
        encoded = np.array([item if isinstance(item, bytes) else _read(item) for item in images], dtype=object)
        inputs = {"image_bytes": encoded}
        if class_index is not None:
            inputs["class_index"] = np.asarray(class_index, dtype=np.int64)
            signature = "explain_class_bytes" if signature == "serving_bytes" else signature
        return self.predict(inputs, signature=signature, outputs=outputs)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- REST -----------------------------------------------------------------------------

    def rest_url(self) -> str:
        version = f"/versions/{self.version}" if self.version is not None else ""
        return f"http://{self.address}/v1/models/{self.model_name}{version}:predict"

    def _predict_rest(self, inputs, signature: str) -> dict[str, np.ndarray]:
        body = rest.dumps(rest.request_body(inputs, signature_name=signature)).encode("utf-8")
        request = urllib.request.Request(self.rest_url(), data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        self.last_request_bytes = len(body)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                text = answer.read()
        except urllib.error.HTTPError as e:
            raise ServingError(f"{self.rest_url()} answered HTTP {e.code}: {_rest_error(e.read())}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServingError(f"cannot reach {self.rest_url()}: {getattr(e, 'reason', e)}") from None
        self.last_response_bytes = len(text)
        try:
            return rest.decode_response(text)
        except RestFormatError as e:
            raise ServingError(str(e)) from None

    # -- gRPC -----------------------------------------------------------------------------

    def _predict_grpc(self, inputs, signature: str, outputs) -> dict[str, np.ndarray]:
        import grpc

        from gbp_rewrite.serving import grpc_messages

        request = grpc_messages.predict_request(inputs, model_name=self.model_name, signature_name=signature)
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        request.output_filter.extend(outputs or [])
        self.last_request_bytes = request.ByteSize()
        try:
            response = self._grpc_stub().Predict(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ServingError(f"{self.address} answered {e.code().name}: {_first_line(e.details())}") from None
        self.last_response_bytes = response.ByteSize()
        return grpc_messages.decode_predict_response(response)

    def _grpc_stub(self):
        if self._stub is None:
            import grpc

            from gbp_rewrite.serving import grpc_messages

            _, service = grpc_messages.apis()
            options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                       ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
            self._channel = grpc.insecure_channel(self.address, options=options)
            self._stub = service.PredictionServiceStub(self._channel)
        return self._stub


def _read(path) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as e:
        raise OptionError(f"cannot read the image '{path}': {e.strerror}") from None


def _first_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else "(no details)"


def _rest_error(body: bytes) -> str:
    """TF Serving's {"error": "..."} message, else the body's first line."""
    try:
        return _first_line(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return _first_line(body.decode("utf-8", errors="replace"))
