"""`gbp-rewrite request DIR --image PATH ...`: the body of a TF Serving REST predict request."""

from __future__ import annotations

import sys

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS

NAME = "request"
ARGS = ("DIR",)
SUMMARY = ("Write the JSON body of a TF Serving REST predict request (row format: "
           '{"signature_name": ..., "instances": [{<input>: pixels}, ...]}) for image files (--image), '
           "decoded, resized to the signature's input size and preprocessed as by `explain`, to --out "
           "(default: stdout).")
FLAG_NAMES = {"image", "signature", "preprocess", "out", "grayscale_to_rgb"}


def run(model: str) -> None:
    from gbp_rewrite.cli import UsageError
    from gbp_rewrite.serving.request import make_request, write_request
    from gbp_rewrite.serving import rest

    if not FLAGS.image:
        raise UsageError("'request' needs at least one --image PATH")
    body = make_request(model, common.split_paths(FLAGS.image), signature=FLAGS.signature,
                        preprocess=FLAGS.preprocess, grayscale_to_rgb=FLAGS.grayscale_to_rgb)
    if FLAGS.out:
        path = write_request(body, FLAGS.out)
        sys.stderr.write(f"wrote {path}: {len(body['instances'])} instance(s) for signature "
                         f"{body['signature_name']!r} (preprocessing {FLAGS.preprocess})\n")
    else:
        sys.stdout.write(rest.dumps(body) + "\n")
