"""The `beam` extra: a one-line error naming it when apache-beam is not installed."""

from __future__ import annotations

from gbp_rewrite.errors import MissingExtraError

INSTALL = "pip install -e '.[beam]'"


def require_beam() -> None:
    """Raise MissingExtraError unless apache_beam can be imported."""
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"running explain as a Beam pipeline needs apache-beam, which is not "
                                f"installed; install the beam extra: {INSTALL}") from None
