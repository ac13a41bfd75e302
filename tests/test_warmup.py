"""TF Serving's warm-up file in the export (gbp_rewrite.serving.warmup, issue 16 part 4).

Read back with tensorflow-serving-api's PredictionLog and TensorFlow's TFRecord reader, run with
tf.saved_model.load; `verify` must pass a good file and fail a broken one.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

import gbp_rewrite

WARMUP = ("assets.extra", "tf_serving_warmup_requests")


def logged_requests(export) -> list[predict_pb2.PredictRequest]:
    path = export.joinpath(*WARMUP)
    records = tf.data.TFRecordDataset(str(path)).as_numpy_iterator()
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in records]
    assert all(log.WhichOneof("log_type") == "predict_log" for log in logs)
    return [log.predict_log.request for log in logs]


@pytest.mark.parametrize("options, signatures", [
    ({}, ["serving_default", "explain_class"]),
    ({"image_bytes": True}, ["serving_default", "explain_class", "serving_bytes", "explain_class_bytes"]),
])
def test_one_batch_1_request_per_explainable_signature_and_each_runs(zoo, options, signatures):
    export, report = zoo.converted("shapes_cnn", **options)
    requests = logged_requests(export)
    assert [r.model_spec.signature_name for r in requests] == signatures
    loaded = zoo.loaded(export)
    for request in requests:
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        assert {v.shape[0] for v in inputs.values()} == {1}
        outputs = loaded.signatures[request.model_spec.signature_name](**inputs)
        assert np.all(np.isfinite(outputs["saliency"].numpy()))
    assert "4 requests" in report.checks["warm-up"] if options else "2 requests" in report.checks["warm-up"]


def test_the_bytes_request_is_a_png_of_the_input_size(zoo):
    export, _ = zoo.converted("shapes_cnn", image_bytes=True)
    request = next(r for r in logged_requests(export) if r.model_spec.signature_name == "serving_bytes")
    data = tf.make_ndarray(request.inputs["image_bytes"])[0]
    assert tf.io.decode_png(data).shape == (32, 32, 3)


def test_verify_runs_the_warmup_requests_and_fails_a_broken_file(zoo, tmp_path):
    export, _ = zoo.converted("shapes_cnn")
    report = gbp_rewrite.verify_export(export, serving_check=tmp_path / "no_binary")
    check = report.check("warm-up requests: assets.extra/tf_serving_warmup_requests")
    assert check.status == "pass" and "2 requests parse and run" in check.detail
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = "no_such_signature"
    with tf.io.TFRecordWriter(str(broken.joinpath(*WARMUP))) as writer:
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        writer.write(log.SerializeToString())
    report = gbp_rewrite.verify_export(broken, serving_check=tmp_path / "no_binary")
    check = report.check("warm-up requests: assets.extra/tf_serving_warmup_requests")
    assert check.status == "fail" and "no_such_signature" in check.detail and not report.ok
