"""`gbp-rewrite explain MODEL --glob 'PATTERN' --out OUT --runner NAME [-- beam options]`.

The explain command as an Apache Beam pipeline (gbp_rewrite.beam.run_explain), which prints the
pipeline's metrics `explained` and `failed` at the end. Imported only when --runner is given.
"""

from __future__ import annotations

import sys

from absl import flags

from gbp_rewrite.cli import common

FLAGS = flags.FLAGS


def run(model: str) -> None:
    from gbp_rewrite.cli import UsageError
    from gbp_rewrite.errors import ImageError

    if not FLAGS.runner:
        raise UsageError("--glob, --saliency_format and options after -- are for a Beam pipeline: add "
                         "--runner NAME (e.g. --runner DirectRunner)")
    if FLAGS.image or FLAGS.dir:
        raise UsageError("with --runner the images are given with --glob 'PATTERN' (not --image or --dir)")
    if not FLAGS.glob:
        raise UsageError("'explain --runner' needs --glob 'PATTERN', the image files")
    if not FLAGS.out:
        raise UsageError("'explain' needs --out OUTDIR, the folder for the pictures")
    from gbp_rewrite.beam.extra import require_beam

    require_beam()
    from gbp_rewrite.beam.run import run_explain

    summary = run_explain(
        model, common.split_paths(FLAGS.glob), out=FLAGS.out, runner=FLAGS.runner,
        beam_args=_quiet_workers(common.PASSTHROUGH), preprocess=FLAGS.preprocess, batch_size=FLAGS.batch_size,
        class_index=FLAGS["class"].value, grayscale_to_rgb=FLAGS.grayscale_to_rgb,
        allow_file_ops=FLAGS.allow_file_ops, saliency_format=FLAGS.saliency_format,
    )
    sys.stdout.write(summary.to_text() + "\n")
    if summary.failed:
        raise ImageError(f"{summary.failed} of {summary.explained + summary.failed} image(s) could not be "
                         f"explained (listed with their reason in {summary.results})")


def _quiet_workers(beam_args: list[str]) -> list[str]:
    """Beam's worker processes log every step at INFO; keep them to errors, as the rest of the CLI,
    unless --verbose or the user chose a level."""
    if FLAGS.verbose or any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
        return list(beam_args)
    return [*beam_args, "--default_sdk_harness_log_level=ERROR"]
