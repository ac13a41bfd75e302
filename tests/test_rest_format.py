"""TF Serving REST: `request` bodies parse as the model server parses them, and responses written
the way the server writes them (tf_serving_json, a model of json_tensor.cc) decode back exactly."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import tensorflow as tf

import gbp_rewrite
import tf_serving_json as server
from conftest import REPO, cli_command
from gbp_rewrite.pictures import render
from gbp_rewrite.serving import rest
from gbp_rewrite.errors import ImageError, OptionError, RestFormatError, SignatureError

IMAGES = sorted((REPO / "testdata" / "images").glob("*.png"))[:3]


@pytest.fixture(scope="module")
def export(zoo):
    return zoo.converted("shapes_cnn")[0]


def _input_dtypes(function) -> dict[str, np.dtype]:
    return {k: s.dtype.as_numpy_dtype for k, s in function.structured_input_signature[1].items()}


def _serve(export_dir, signature, body_text):
    """What the model server does with a request body: parse, run the signature, write the response."""
    function = tf.saved_model.load(str(export_dir)).signatures[signature]
    name, tensors, _ = server.parse_predict_request(body_text, _input_dtypes(function))
    assert name == signature
    outputs = {k: v.numpy() for k, v in function(**{k: tf.constant(v) for k, v in tensors.items()}).items()}
    return tensors, outputs


def _decoded_png(path) -> np.ndarray:
    return tf.io.decode_png(tf.io.read_file(str(path)), channels=3).numpy()


# ---------------------------------------------------------------------------------------------
# Requests


def test_request_parses_as_the_server_parses_it(export):
    body = gbp_rewrite.make_request(export, IMAGES)
    text = rest.dumps(body)
    assert set(body) == {"signature_name", "instances"} and body["signature_name"] == "serving_default"
    assert all(set(instance) == {"image"} for instance in body["instances"])
    name, tensors, layout = server.parse_predict_request(text, {"image": np.float32})
    assert (name, layout) == ("serving_default", "row")
    # The testdata images are 32x32 like the model input: no resampling, exactly pixels / 255.
    expected = np.stack([_decoded_png(p) for p in IMAGES]).astype(np.float32) / np.float32(255)
    assert tensors["image"].dtype == np.float32 and tensors["image"].shape == (len(IMAGES), 32, 32, 3)
    np.testing.assert_array_equal(tensors["image"], expected)
    # Short decimals (0.003921569, not 0.003921568859368563) that still read back exactly.
    assert "0.0039215688" not in text


@pytest.mark.parametrize("mode,formula", [
    ("unit", lambda p: p / 255.0),
    ("symmetric", lambda p: p / 127.5 - 1.0),
    ("caffe", lambda p: p[..., ::-1] - np.array([103.939, 116.779, 123.68])),
    ("none", lambda p: p),
])
def test_preprocessing_modes(export, mode, formula):
    body = gbp_rewrite.make_request(export, IMAGES[:1], preprocess=mode)
    got = np.asarray(body["instances"][0]["image"], np.float32)
    want = formula(_decoded_png(IMAGES[0]).astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_images_are_resized_to_the_signature_input(export, tmp_path):
    colour = np.array([200, 40, 90], np.uint8)
    big = tmp_path / "big.png"
    tf.io.write_file(str(big), tf.io.encode_png(np.tile(colour, (48, 64, 1))))
    body = gbp_rewrite.make_request(export, [big])
    pixels = np.asarray(body["instances"][0]["image"], np.float32)
    assert pixels.shape == (32, 32, 3)
    np.testing.assert_allclose(pixels, np.broadcast_to(colour / 255.0, (32, 32, 3)), atol=1e-6)


def test_request_errors(export, tmp_path):
    with pytest.raises(SignatureError, match="class_index"):  # two inputs: not one image
        gbp_rewrite.make_request(export, IMAGES[:1], signature="explain_class")
    with pytest.raises(SignatureError, match="no signature 'nope'"):
        gbp_rewrite.make_request(export, IMAGES[:1], signature="nope")
    with pytest.raises(OptionError, match="symmetric"):
        gbp_rewrite.make_request(export, IMAGES[:1], preprocess="imagenet")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(ImageError, match="notes.png"):
        gbp_rewrite.make_request(export, [IMAGES[0], not_image])


def test_row_request_needs_one_batch_size():
    with pytest.raises(RestFormatError, match="same batch size"):
        rest.request_body({"a": np.zeros((2, 3)), "b": np.zeros((3,))})
    body = rest.request_body({"a": np.zeros((2, 3)), "b": np.zeros((3,))}, columnar=True)
    _, tensors, layout = server.parse_predict_request(rest.dumps(body), {"a": np.float64, "b": np.float64})
    assert layout == "columnar" and tensors["a"].shape == (2, 3) and tensors["b"].shape == (3,)


def test_request_values_of_every_rest_dtype_parse():
    inputs = {
        "f32": np.array([[1 / 3, -0.0, np.nan, np.inf], [1e-30, 3e38, 2.5, -np.inf]], np.float32),
        "f64": np.array([np.pi, 1e300], np.float64),
        "i64": np.array([2**40, -7], np.int64),
        "flag": np.array([True, False]),
        "text": np.array([b"caf\xc3\xa9", b"\xff\x00"], dtype=object),
    }
    text = rest.dumps(rest.request_body(inputs, signature_name="s"))
    dtypes = {"f32": np.float32, "f64": np.float64, "i64": np.int64, "flag": np.bool_, "text": object}
    _, tensors, _ = server.parse_predict_request(text, dtypes)
    for key, want in inputs.items():
        if want.dtype.kind == "f":
            np.testing.assert_array_equal(tensors[key].astype(want.dtype), want)
        else:
            assert tensors[key].tolist() == want.tolist(), key


# ---------------------------------------------------------------------------------------------
# Responses


def test_row_response_decodes_exactly(export):
    tensors, outputs = _serve(export, "serving_default", rest.dumps(gbp_rewrite.make_request(export, IMAGES)))
    response = server.row_format_response(outputs)
    assert json.loads(response)["predictions"][0].keys() == set(outputs)  # one object per example
    decoded = gbp_rewrite.decode_response(response)
    assert sorted(decoded) == sorted(outputs) == ["explained_class", "output_0", "saliency"]
    for key, want in outputs.items():
        assert decoded[key].dtype == want.dtype, key  # float32 and int64
        np.testing.assert_array_equal(decoded[key], want, err_msg=key)
    assert decoded["saliency"].shape == tensors["image"].shape
    assert np.any(decoded["saliency"] != 0)


def test_columnar_and_single_output_responses(export):
    body = rest.dumps(gbp_rewrite.make_request(export, IMAGES[:2]))
    _, outputs = _serve(export, "serving_default", body)
    decoded = rest.decode_response(server.columnar_response(outputs))
    for key, want in outputs.items():
        np.testing.assert_array_equal(decoded[key], want, err_msg=key)
    # The Keras export's 'serve' signature has one output: the server omits its name.
    serve_body = rest.dumps({**json.loads(body), "signature_name": "serve"})
    _, single = _serve(export, "serve", serve_body)
    (key, value), = single.items()
    row = server.row_format_response(single)
    assert isinstance(json.loads(row)["predictions"][0], list)
    np.testing.assert_array_equal(rest.decode_response(row, single_output=key)[key], value)
    np.testing.assert_array_equal(rest.decode_response(server.columnar_response(single))["output"], value)


def test_special_values_and_dtypes_round_trip():
    outputs = {
        "scores": np.array([[np.nan, np.inf, -np.inf, 1e-45], [0.1, 3.0, -2.5e10, 16777217.0]], np.float32),
        "wide": np.array([np.pi, 1 / 3], np.float64),
        "count": np.array([2**40, -1], np.int64),
        "flag": np.array([True, False]),
        "name_bytes": np.array([b"\x00\xff", b"ok"], dtype=object),
    }
    decoded = rest.decode_response(server.row_format_response(outputs), dtypes={"wide": np.float64})
    np.testing.assert_array_equal(decoded["scores"], outputs["scores"])
    np.testing.assert_array_equal(decoded["wide"], outputs["wide"])
    assert decoded["count"].dtype == np.int64 and decoded["count"].tolist() == [2**40, -1]
    assert decoded["flag"].tolist() == [True, False]
    assert decoded["name_bytes"].tolist() == [b"\x00\xff", b"ok"]  # {"b64": ...} decoded


def test_bad_responses():
    with pytest.raises(RestFormatError, match="Servable not found"):
        rest.decode_response('{"error": "Servable not found for request: Latest(shapes)"}')
    with pytest.raises(RestFormatError, match="'predictions'"):
        rest.decode_response('{"instances": [1]}')
    with pytest.raises(RestFormatError, match="example 1"):
        rest.decode_response('{"predictions": [{"a": 1, "b": 2}, {"a": 1}]}')
    with pytest.raises(RestFormatError, match="rectangular"):
        rest.decode_response('{"predictions": [{"a": [1, 2]}, {"a": [1]}]}')
    with pytest.raises(RestFormatError, match="not JSON"):
        rest.decode_response("<html>502 Bad Gateway</html>")


def test_server_model_rejects_what_the_server_rejects():
    """The model of json_tensor.cc is only worth something if it can say no."""
    with pytest.raises(server.JsonTensorError, match="keys must be equal"):
        server.parse_predict_request('{"instances": [{"image": [1.0], "extra": 1}]}', {"image": np.float32})
    with pytest.raises(server.JsonTensorError, match="expected type"):
        server.parse_predict_request('{"instances": [{"k": 1.5}]}', {"k": np.int64})
    with pytest.raises(server.JsonTensorError, match="Expecting shape"):
        server.parse_predict_request('{"instances": [[1.0, 2.0], [1.0]]}', {"x": np.float32})
    with pytest.raises(server.JsonTensorError, match="inconsistent batch size"):
        server.row_format_response({"a": np.zeros((2, 3)), "b": np.zeros((3,))})
    with pytest.raises(server.JsonTensorError, match="no shape information"):
        server.row_format_response({"a": np.zeros((2, 3)), "total": np.float32(1.0)})


# ---------------------------------------------------------------------------------------------
# Files and the command line


def test_decoded_response_files(export, tmp_path):
    _, outputs = _serve(export, "serving_default", rest.dumps(gbp_rewrite.make_request(export, IMAGES[:2])))
    from gbp_rewrite.serving.response_files import write_response_files

    arrays = rest.decode_response(server.row_format_response(outputs))
    written = write_response_files(arrays, tmp_path / "out", image_paths=IMAGES[:2])
    names = sorted(p.name for p in written)
    stems = [p.stem for p in IMAGES[:2]]
    assert names == sorted([f"{k}.npy" for k in outputs]
                           + [f"{s}_saliency_{kind}.png" for s in stems for kind in ("figure", "guided", "heatmap", "overlay")])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "saliency.npy"), outputs["saliency"])
    heatmap = _decoded_png(tmp_path / "out" / f"{stems[0]}_saliency_heatmap.png")
    assert heatmap.shape == (224, 224, 3) and heatmap.std() > 0  # 32 px enlarged 7 times
    without_images = write_response_files(arrays, tmp_path / "plain")
    assert sorted(p.name for p in without_images if p.suffix == ".png") == [
        f"example_{i}_saliency_{kind}.png" for i in range(2) for kind in ("guided", "heatmap")]
    # Each example's pictures are its own saliency's (not another example's).
    for i, (stem, image) in enumerate(zip(stems, IMAGES[:2])):
        heat = np.kron(render.saliency_heat(outputs["saliency"][i]), np.ones((7, 7)))
        for folder, name in ((tmp_path / "out", stem), (tmp_path / "plain", f"example_{i}")):
            np.testing.assert_array_equal(_decoded_png(folder / f"{name}_saliency_heatmap.png"),
                                          render.colormap(heat), err_msg=f"{folder.name}/{name}")
        np.testing.assert_array_equal(_decoded_png(tmp_path / "out" / f"{stem}_saliency_overlay.png"),
                                      render.overlay(np.kron(_decoded_png(image)[:, :, :3], np.ones((7, 7, 1), np.uint8)), heat),
                                      err_msg=stem)
    with pytest.raises(ImageError, match="1 image"):
        write_response_files(arrays, tmp_path / "bad", image_paths=IMAGES[:1])


def test_request_and_decode_commands(export, tmp_path):
    body = gbp_rewrite.make_request(export, IMAGES[:2])
    _, outputs = _serve(export, "serving_default", rest.dumps(body))
    response = tmp_path / "response.json"
    response.write_text(server.row_format_response(outputs))
    request_file = tmp_path / "request.json"
    procs = {
        "request": subprocess.Popen(cli_command("request", export, "--image", IMAGES[0], "--image", IMAGES[1],
                                                "--out", request_file),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "decode": subprocess.Popen(cli_command("decode", response, "--out", tmp_path / "decoded",
                                               "--image", f"{IMAGES[0]},{IMAGES[1]}",
                                               "--labels", REPO / "testdata" / "shapes_cnn_labels.txt"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "usage": subprocess.Popen(cli_command("decode", response), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True),
    }
    results = {name: (proc.wait(timeout=300), *proc.communicate()) for name, proc in procs.items()}
    code, _, err = results["request"]
    assert code == 0, err
    assert json.loads(request_file.read_text()) == json.loads(rest.dumps(body))
    code, out, err = results["decode"]
    assert code == 0, err
    assert "saliency float32[2, 32, 32, 3]" in out
    np.testing.assert_array_equal(np.load(tmp_path / "decoded" / "output_0.npy"), outputs["output_0"])
    assert (tmp_path / "decoded" / f"{IMAGES[1].stem}_saliency_overlay.png").is_file()
    assert (tmp_path / "decoded" / f"{IMAGES[1].stem}_saliency_figure.png").is_file()
    code, _, err = results["usage"]
    assert code == 2 and "--out" in err


def test_request_class_builds_an_explain_class_body(export, tmp_path):
    """`request --class N`: the body calls explain_class with class_index N in every instance, and
    what the server answers explains class N (compared with calling the signature directly)."""
    body_file = tmp_path / "body.json"
    done = subprocess.run(cli_command("request", export, "--image", IMAGES[0], "--image", IMAGES[1],
                                      "--class", "2", "--out", body_file),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    body = json.loads(body_file.read_text())
    assert body["signature_name"] == "explain_class"
    assert [instance["class_index"] for instance in body["instances"]] == [2, 2]
    tensors, outputs = _serve(export, "explain_class", body_file.read_text())
    assert list(outputs["explained_class"]) == [2, 2]
    pixels = np.stack([_decoded_png(p) / 255.0 for p in IMAGES[:2]]).astype(np.float32)
    np.testing.assert_array_equal(tensors["image"], pixels)
    refused = subprocess.run(cli_command("request", export, "--image", IMAGES[0], "--class", "2",
                                         "--signature", "serving_default"),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "takes no 'class_index' input" in refused.stderr, refused.stderr
