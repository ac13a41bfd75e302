"""`gbp-rewrite explain MODEL --glob 'PATTERN' --out OUT --runner NAME [-- beam options]`.

The explain command as an Apache Beam pipeline (gbp_rewrite.beam.run_explain), which prints the
pipeline's metrics `explained` and `failed` at the end. Imported only when --runner is given.
"""

from __future__ import annotations

import argparse
import sys

from gbp_rewrite.cli import common
from gbp_rewrite.errors import ImageError


def check_usage(args: argparse.Namespace) -> None:
    """The flag combinations `explain --runner` needs (checked before TensorFlow is imported)."""
    if not args.runner:
        raise common.UsageError("--glob, --saliency_format and options after -- are for a Beam pipeline: add "
                                "--runner NAME (e.g. --runner DirectRunner)")
    if args.image or args.dir:
        raise common.UsageError("with --runner the images are given with --glob 'PATTERN' (not --image or --dir)")
    if not args.glob:
        raise common.UsageError("'explain --runner' needs --glob 'PATTERN', the image files")
    if not args.out:
        raise common.UsageError("'explain' needs --out OUTDIR, the folder for the pictures")


def run(args: argparse.Namespace) -> None:
    from gbp_rewrite.beam.extra import require_beam

    require_beam()
    from gbp_rewrite.beam.run import run_explain

    summary = run_explain(
        args.model, common.split_paths(args.glob), out=args.out, runner=args.runner,
        beam_args=_quiet_workers(args.passthrough, verbose=args.verbose), preprocess=args.preprocess,
        batch_size=args.batch_size, class_index=args.class_index, grayscale_to_rgb=args.grayscale_to_rgb,
        allow_file_ops=args.allow_file_ops, saliency_format=args.saliency_format,
    )
    sys.stdout.write(summary.to_text() + "\n")
    if summary.failed:
        raise ImageError(f"{summary.failed} of {summary.explained + summary.failed} image(s) could not be "
                         f"explained (listed with their reason in {summary.results})")


def _quiet_workers(beam_args: list[str], *, verbose: bool) -> list[str]:
    """Beam's worker processes log every step at INFO; keep them to errors, as the rest of the CLI,
    unless --verbose or the user chose a level."""
    if verbose or any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
        return list(beam_args)
    return [*beam_args, "--default_sdk_harness_log_level=ERROR"]
