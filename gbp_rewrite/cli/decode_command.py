"""`gbp-rewrite decode RESPONSE.json --out DIR`: a TF Serving REST response back to arrays and PNGs."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS

NAME = "decode"
ARGS = ("RESPONSE",)
SUMMARY = ("Turn a TF Serving REST predict response (RESPONSE is a JSON file, or - for stdin; row "
           "format 'predictions' or columnar 'outputs') into one .npy per output and, per example, the "
           "saliency heat map and guided picture as PNG in --out; with the request's --image files "
           "also the overlays; `saliency_png*_bytes` outputs are written as the PNG files they are. "
           "With --grpc, RESPONSE is a serialised PredictResponse (gRPC).")
FLAG_NAMES = {"out", "image", "grpc"}


def run(response: str) -> None:
    from gbp_rewrite.cli import UsageError
    from gbp_rewrite.errors import RestFormatError
    from gbp_rewrite.response_files import write_response_files
    from gbp_rewrite.rest import decode_response

    if not FLAGS.out:
        raise UsageError("'decode' needs --out DIR, the folder for the arrays and pictures")
    if FLAGS.grpc:
        from gbp_rewrite.serving import grpc_messages

        data = sys.stdin.buffer.read() if response == "-" else None
        arrays = (grpc_messages.decode_predict_response(data) if data is not None
                  else grpc_messages.read_predict_response(response))
    else:
        try:
            text = sys.stdin.read() if response == "-" else Path(response).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "not UTF-8 text (a gRPC PredictResponse? use --grpc)"
            raise RestFormatError(f"cannot read the response '{response}': {why}") from None
        arrays = decode_response(text)
    written = write_response_files(arrays, FLAGS.out, image_paths=common.split_paths(FLAGS.image or []))
    shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
    sys.stdout.write(f"decoded {shapes}\nwrote {len(written)} file(s) to {FLAGS.out}\n")
    for path in written:
        sys.stdout.write(f"  {path.name}\n")
