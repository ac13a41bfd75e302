"""gRPC and REST against the in-process stand-in (tests/grpc_stand_in.py), issue 16 parts 3 and 6.

The reference for every answer is the export run locally with tf.saved_model.load on the same
inputs; the stand-in shares no code with gbp_rewrite (gRPC: tensorflow-serving-api's service and
TensorFlow's TensorProto conversion; REST: tests/tf_serving_json.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from conftest import cli_command
from grpc_stand_in import StandIn
from gbp_rewrite.errors import ImageError, OptionError, ServingError
from gbp_rewrite.serving import Client, grpc_messages

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted(str(p) for p in (REPO / "testdata" / "images").glob("*.png"))
MODEL = "shapes"


@pytest.fixture(scope="module")
def export(zoo):
    path, _ = zoo.converted("shapes_cnn", image_bytes=True, saliency_map_dtype="uint8", saliency_png=True)
    return path


@pytest.fixture(scope="module")
def server(export):
    with StandIn(export, model_name=MODEL) as stand_in:
        yield stand_in


def local(zoo, export, signature, **inputs):
    outputs = zoo.loaded(export).signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def encoded(paths):
    return np.array([Path(p).read_bytes() for p in paths], dtype=object)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_explains_image_bytes_like_the_export(zoo, export, server, protocol):
    address = server.grpc_address if protocol == "grpc" else server.rest_address
    assert address.startswith("127.0.0.1:")
    with Client(address, model_name=MODEL, protocol=protocol) as client:
        got = client.explain_images(IMAGES[:3])
    want = local(zoo, export, "serving_bytes", image_bytes=encoded(IMAGES[:3]))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if value.dtype == object:
            assert list(got[key]) == list(value), key
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)
            if protocol == "grpc":
                assert got[key].dtype == value.dtype, key


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_explains_a_chosen_class_and_float_pixels(zoo, export, server, protocol):
    address = server.grpc_address if protocol == "grpc" else server.rest_address
    with Client(address, model_name=MODEL, protocol=protocol) as client:
        by_class = client.explain_images(IMAGES[:2], class_index=[2, 3])
        pixels = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
        floats = client.predict({"image": pixels})
    np.testing.assert_array_equal(by_class["explained_class"], [2, 3])
    want = local(zoo, export, "explain_class_bytes", image_bytes=encoded(IMAGES[:2]),
                 class_index=np.array([2, 3], np.int64))
    np.testing.assert_array_equal(by_class["saliency"], want["saliency"])
    np.testing.assert_array_equal(floats["saliency"], local(zoo, export, "serving_default", image=pixels)["saliency"])


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
@pytest.mark.parametrize("data, message", [
    (b"GIF87a but not really", "GIF"),                 # a wrong (broken) image format
    (b"plain text, not an image", "Unknown image file format"),  # undecodable bytes
])
def test_bad_image_bytes_get_a_tf_serving_error(server, protocol, data, message):
    address = server.grpc_address if protocol == "grpc" else server.rest_address
    kind = "INVALID_ARGUMENT" if protocol == "grpc" else "HTTP 400"
    with Client(address, model_name=MODEL, protocol=protocol) as client:
        with pytest.raises(ServingError, match=f"{kind}.*{message}"):
            client.explain_images([Path(IMAGES[0]).read_bytes(), data])


def test_rest_batch_mixing_sizes_is_refused_by_the_server(server):
    import json
    import urllib.error
    import urllib.request

    instances = [{"image": np.zeros((32, 32, 3)).tolist()}, {"image": np.zeros((16, 16, 3)).tolist()}]
    request = urllib.request.Request(f"http://{server.rest_address}/v1/models/{MODEL}:predict",
                                     data=json.dumps({"instances": instances}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 400
    assert "Expecting shape [32, 32, 3] but got: [16, 16, 3]" in json.loads(raised.value.read())["error"]


def test_client_refuses_a_batch_mixing_sizes_before_sending(server):
    with Client(server.rest_address, model_name=MODEL) as client:
        with pytest.raises(Exception, match="setting an array element|inhomogeneous|same batch size"):
            client.predict({"image": [np.zeros((32, 32, 3)), np.zeros((16, 16, 3))]})


def test_grpc_wrong_dtype_unknown_signature_and_model(server):
    with Client(server.grpc_address, model_name=MODEL, protocol="grpc") as client:
        with pytest.raises(ServingError, match="INVALID_ARGUMENT.*Expects arg\\[image\\] to be float32 but string"):
            client.predict({"image": encoded(IMAGES[:1])})
        with pytest.raises(ServingError, match="INVALID_ARGUMENT.*\"nope\" not found"):
            client.predict({"image": np.zeros((1, 32, 32, 3), np.float32)}, signature="nope")
    with Client(server.grpc_address, model_name="other", protocol="grpc") as client:
        with pytest.raises(ServingError, match="NOT_FOUND"):
            client.explain_images(IMAGES[:1])


def test_unreachable_server_and_bad_options_are_one_line_errors():
    with pytest.raises(OptionError, match="protocol 'http'.*rest, grpc"):
        Client("127.0.0.1:1", model_name=MODEL, protocol="http")
    with pytest.raises(OptionError, match="host:port"):
        Client("http://127.0.0.1:1", model_name=MODEL)
    with pytest.raises(ServingError, match="cannot reach"):
        Client("127.0.0.1:1", model_name=MODEL, timeout=5).explain_images(IMAGES[:1])


def test_request_grpc_and_decode_grpc_round_trip(zoo, export, server, tmp_path):
    request_file, response_file = tmp_path / "request.pb", tmp_path / "response.pb"
    done = subprocess.run(cli_command("request", str(export), "--image", ",".join(IMAGES[:2]), "--grpc",
                                      "--signature", "serving_bytes", "--model_name", MODEL,
                                      "--out", str(request_file)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    request = predict_pb2.PredictRequest.FromString(request_file.read_bytes())
    assert request.model_spec.name == MODEL and request.model_spec.signature_name == "serving_bytes"
    assert list(tf.make_ndarray(request.inputs["image_bytes"])) == list(encoded(IMAGES[:2]))
    # Send it as a gRPC client would, save the answer, decode it with the CLI.
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server.grpc_address) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    response_file.write_bytes(response.SerializeToString())
    out = tmp_path / "decoded"
    done = subprocess.run(cli_command("decode", str(response_file), "--grpc", "--out", str(out),
                                      "--image", ",".join(IMAGES[:2])), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = local(zoo, export, "serving_bytes", image_bytes=encoded(IMAGES[:2]))
    np.testing.assert_array_equal(np.load(out / "saliency.npy"), want["saliency"])
    stem = Path(IMAGES[0]).stem
    assert (out / f"{stem}_saliency_png.png").read_bytes() == want["saliency_png_bytes"][0]
    assert (out / f"{stem}_saliency_overlay.png").is_file()


def test_request_refuses_undecodable_files_for_the_bytes_signature(export, tmp_path):
    from gbp_rewrite.serving.request import make_inputs

    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.png.*not an image"):
        make_inputs(export, [IMAGES[0], str(bad)], signature="serving_bytes")


def test_decode_grpc_refuses_a_file_that_is_not_a_response(tmp_path):
    bad = tmp_path / "r.pb"
    bad.write_bytes(b"\x00\x01garbage")
    done = subprocess.run(cli_command("decode", str(bad), "--grpc", "--out", str(tmp_path / "o")),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "PredictResponse" in done.stderr


def test_rest_request_body_for_the_bytes_signature_uses_b64(export):
    from gbp_rewrite import make_request

    body = make_request(export, IMAGES[:1], signature="serving_bytes")
    assert set(body["instances"][0]["image_bytes"]) == {"b64"}


def test_grpc_messages_round_trip_strings_and_floats():
    inputs = {"image_bytes": encoded(IMAGES[:2]), "x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    request = grpc_messages.predict_request(inputs, model_name="m", signature_name="s")
    response = predict_pb2.PredictResponse()
    for key, tensor in request.inputs.items():
        response.outputs[key].CopyFrom(tensor)
    got = grpc_messages.decode_predict_response(response.SerializeToString())
    assert list(got["image_bytes"]) == list(inputs["image_bytes"])
    np.testing.assert_array_equal(got["x"], inputs["x"])


def test_grpc_output_filter_sends_only_the_chosen_outputs(zoo, export, server):
    with Client(server.grpc_address, model_name=MODEL, protocol="grpc") as client:
        got = client.explain_images(IMAGES[:1], outputs=["saliency_png_bytes", "explained_class"])
        small = client.last_response_bytes
        everything = client.explain_images(IMAGES[:1])
        assert client.last_response_bytes > 3 * small
        with pytest.raises(ServingError, match="INVALID_ARGUMENT.*nope"):
            client.explain_images(IMAGES[:1], outputs=["nope"])
    assert sorted(got) == ["explained_class", "saliency_png_bytes"]
    assert list(got["saliency_png_bytes"]) == list(everything["saliency_png_bytes"])
    with Client(server.rest_address, model_name=MODEL) as client:
        assert sorted(client.explain_images(IMAGES[:1], outputs=["explained_class"])) == ["explained_class"]
