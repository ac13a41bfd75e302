"""The one exception family of gbp_rewrite.

Every failure a user can cause (a bad path, a damaged model, an unknown layer name, a destination
that exists) is raised as a subclass of `GbpError`, with a one-line message that names the problem,
the offending value and the valid choices or the fix. The command line prints that line and exits 1.
"""

from gbp_rewrite.conventions import one_line  # noqa: F401  (the package's one-line errors)


class GbpError(Exception):
    """Base class of every error gbp_rewrite raises on purpose."""


class SourceModelError(GbpError):
    """The source model cannot be read, or is not a model this tool can explain."""


class UnsafeModelError(SourceModelError):
    """The model's graph reads or writes files (or the network) and that was not allowed."""


class SignatureError(GbpError):
    """The chosen signature, input or output does not exist or cannot be explained."""


class SelectionError(GbpError):
    """The layer selection matches nothing, or rewrites nothing."""


class OptionError(GbpError):
    """An option has a value outside its valid choices."""


class OutputError(GbpError):
    """The destination cannot be written (exists, is inside the source, ...)."""


class VerificationError(GbpError):
    """The written model failed its self-check."""


class RenderError(GbpError):
    """A saliency map, image or rendering option cannot be made into a picture."""


class ImageError(GbpError):
    """Input images cannot be explained (unreadable, not an image, or not the channels the model takes)."""


class UnsupportedTensorFlowError(GbpError):
    """The installed TensorFlow or Keras lacks an API gbp_rewrite needs (gbp_rewrite.tf_internals)."""


class MissingExtraError(GbpError):
    """An optional dependency (a pip extra of gbp-rewrite) is needed and not installed."""


class RestFormatError(GbpError):
    """A TF Serving REST request or response is not in the documented JSON format, or is an error."""


class ServingError(GbpError):
    """A model server (TF Serving, or the tests' stand-in) refused a request, or could not be reached."""
