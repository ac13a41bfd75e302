"""The one exception family of gbp_rewrite.

Every failure a user can cause (a bad path, a damaged model, an unknown layer name, a destination
that exists) is raised as a subclass of `GbpError`, with a one-line message that names the problem,
the offending value and the valid choices or the fix. The command line prints that line and exits 1.
"""

import re


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


class RestFormatError(GbpError):
    """A TF Serving REST request or response is not in the documented JSON format, or is an error."""


# Lines of a TensorFlow error message that say nothing about the cause: the "Graph execution
# error" banner, the Python stack that defined the failing node, the node reference. (A copy lives
# in standalone_check, which runs without this package; a test keeps the two in step.)
_NOISE = re.compile(r"^(Graph execution error:|Detected at node|<stack traces unavailable>|Traceback|File |\[\[)")


def one_line(error: BaseException) -> str:
    """The first informative line of an exception's message (TensorFlow's run to pages), with the
    node a graph execution error was detected at."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    useful = [line for line in lines if not _NOISE.match(line)]
    node = next((line.split()[3] for line in lines if line.startswith("Detected at node ")), None)
    message = useful[0] if useful else (lines[0] if lines else type(error).__name__)
    return message + (f" (at node {node})" if node else "")


class ServingError(GbpError):
    """A model server (TF Serving, or the tests' stand-in) refused a request, or could not be reached."""
