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
           "also the overlays.")
FLAG_NAMES = {"out", "image"}


def run(response: str) -> None:
    from gbp_rewrite.cli import UsageError
    from gbp_rewrite.errors import RestFormatError
    from gbp_rewrite.serving.response_files import write_response_files
    from gbp_rewrite.serving.rest import decode_response

    if not FLAGS.out:
        raise UsageError("'decode' needs --out DIR, the folder for the arrays and pictures")
    try:
        text = sys.stdin.read() if response == "-" else Path(response).read_text(encoding="utf-8")
    except OSError as e:
        raise RestFormatError(f"cannot read the response '{response}': {e.strerror}") from None
    arrays = decode_response(text)
    written = write_response_files(arrays, FLAGS.out, image_paths=common.split_paths(FLAGS.image or []))
    shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
    sys.stdout.write(f"decoded {shapes}\nwrote {len(written)} file(s) to {FLAGS.out}\n")
    for path in written:
        sys.stdout.write(f"  {path.name}\n")
