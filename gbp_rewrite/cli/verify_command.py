"""`gbp-rewrite verify DIR [--source SRC]`: prove an export runs without gbp_rewrite, as TF Serving would."""

from __future__ import annotations

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS

NAME = "verify"
ARGS = ("DIR",)
SUMMARY = ("Check that the SavedModel DIR runs where users deploy it: in a clean process without "
           "gbp_rewrite, run every signature on a probe batch (predictions equal --source's, saliency "
           "finite and not all zero, outputs keep the batch dimension), audit the op types (no Python "
           "or custom ops), and run TF Serving's C++ loader (built with g++ into ~/.cache/gbp_rewrite on "
           "first use, about a minute; GBP_REWRITE_SERVING_CHECK=none skips it). A model "
           "whose graph reaches files or the network is refused first unless --allow_file_ops. One "
           "PASS/FAIL/SKIP line per check; exit status 1 if any check fails.")
FLAG_NAMES = {"source", "json", "allow_file_ops"}

flags.DEFINE_string("source", None, "verify: the source model (SavedModel directory or .keras/.h5 "
                    "file); each signature's predictions must equal the source's on the same probe inputs.")


def run(export_dir: str) -> None:
    from gbp_rewrite.deploy_check import verify_export
    from gbp_rewrite.errors import VerificationError

    report = verify_export(export_dir, source=FLAGS.source, allow_file_ops=FLAGS.allow_file_ops)
    common.emit(report)
    if not report.ok:
        raise VerificationError(report.failure_summary())
