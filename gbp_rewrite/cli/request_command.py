"""`gbp-rewrite request DIR --image PATH ...`: the body of a TF Serving REST (or gRPC) predict request."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS

NAME = "request"
ARGS = ("DIR",)
SUMMARY = ("Write the JSON body of a TF Serving REST predict request (row format: "
           '{"signature_name": ..., "instances": [{<input>: pixels}, ...]}) for image files (--image), '
           "decoded, resized to the signature's input size and preprocessed as by `explain`, to --out "
           "(default: stdout); for an image-bytes signature (--signature serving_bytes) the files' own "
           'bytes as {"b64": ...}. With --grpc, a serialised PredictRequest instead (--out required).')
FLAG_NAMES = {"image", "signature", "preprocess", "out", "grayscale_to_rgb", "grpc", "model_name"}

flags.DEFINE_bool("grpc", False, "request: write a serialised tensorflow.serving.PredictRequest (gRPC) to "
                  "--out instead of the REST JSON body. decode: RESPONSE is a serialised PredictResponse. "
                  "Needs the optional extra 'serving' (tensorflow-serving-api).")
flags.DEFINE_string("model_name", None, "request --grpc: the model name in the request's model_spec "
                    "(default: DIR's folder name, or its parent's when DIR is a numbered version).")


def default_model_name(model: str) -> str:
    path = Path(model).resolve()
    return path.parent.name if path.name.isdigit() else path.name


def run(model: str) -> None:
    from gbp_rewrite.cli import UsageError
    from gbp_rewrite.serving_request import make_inputs, write_request
    from gbp_rewrite import rest

    if not FLAGS.image:
        raise UsageError("'request' needs at least one --image PATH")
    if FLAGS.grpc and not FLAGS.out:
        raise UsageError("'request --grpc' writes a binary PredictRequest: give the file with --out")
    inputs = make_inputs(model, common.split_paths(FLAGS.image), signature=FLAGS.signature,
                         preprocess=FLAGS.preprocess, grayscale_to_rgb=FLAGS.grayscale_to_rgb)
    count = len(next(iter(inputs.values())))
    if FLAGS.grpc:
        from gbp_rewrite.serving import grpc_messages

        name = FLAGS.model_name or default_model_name(model)
        message = grpc_messages.predict_request(inputs, model_name=name, signature_name=FLAGS.signature)
        path = grpc_messages.write_message(message, FLAGS.out)
        sys.stderr.write(f"wrote {path}: PredictRequest for model {name!r}, signature {FLAGS.signature!r}, "
                         f"{count} example(s) ({message.ByteSize()} bytes)\n")
        return
    body = rest.request_body(inputs, signature_name=FLAGS.signature)
    if FLAGS.out:
        path = write_request(body, FLAGS.out)
        sys.stderr.write(f"wrote {path}: {count} instance(s) for signature "
                         f"{body['signature_name']!r} (preprocessing {FLAGS.preprocess})\n")
    else:
        sys.stdout.write(rest.dumps(body) + "\n")
