"""Build the C++ serving check now, into the user cache (`verify` also builds it on first use).

Usage (with the project's venv python):

    python tools/serving_check/build.py [--force]

A thin wrapper over gbp_rewrite.deploy.serving_check_build: the source is gbp_rewrite/cpp/serving_check.cc
(package data) and the binary goes to $GBP_REWRITE_CACHE_DIR, else $XDG_CACHE_HOME/gbp_rewrite,
else ~/.cache/gbp_rewrite, in a folder named after the TensorFlow version and the source's hash.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if it is built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gbp_rewrite.deploy import serving_check_build

    try:
        path = serving_check_build.build(force=args.force)
    except serving_check_build.BuildError as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
