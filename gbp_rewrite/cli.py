"""gbp-rewrite: make TensorFlow models explain themselves with guided backpropagation.

Usage:
  gbp-rewrite inspect MODEL [--signature KEY] [--json]
  gbp-rewrite convert SRC DST [--layers a,b*] [--exclude_layers c] [--rule guided|deconvnet|vanilla]
                              [--signature KEY] [--output KEY] [--score logit|probability]
                              [--overwrite]

Commands:
  inspect   List a SavedModel's signatures (inputs, outputs) and its ReLU-family ops by layer.
  convert   Write an explainable copy of SRC to DST: the signature returns the original outputs
            plus `saliency` (d score / d input, same shape and dtype as the input) and
            `explained_class`; a second signature `explain_class` takes a class per example.

Exit status: 0 success, 1 the model could not be converted (one-line reason), 2 bad usage.
"""

from __future__ import annotations

import json
import os
import signal
import sys

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is not for users of a CLI; set
# before TensorFlow is imported, and only if the user has not chosen a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging as absl_logging  # noqa: E402

from gbp_rewrite._version import __version__  # noqa: E402

PROGRAM = "gbp-rewrite"
RULE_NAMES = ("guided", "deconvnet", "vanilla")
SCORE_NAMES = ("logit", "probability")

FLAGS = flags.FLAGS
flags.DEFINE_list("layers", None, "convert: names or glob patterns of the layers whose ReLUs get the "
                  "rule (default: every ReLU). A nested model's name selects all its layers.")
flags.DEFINE_list("exclude_layers", None, "convert: names or glob patterns of layers to leave alone.")
flags.DEFINE_enum("rule", "guided", RULE_NAMES, "convert: the gradient rule: guided (dy*[x>0]*[dy>0]), "
                  "deconvnet (dy*[dy>0]) or vanilla (the true gradient).")
flags.DEFINE_string("signature", "serving_default", "inspect/convert: the signature to explain.")
flags.DEFINE_string("output", None, "convert: the output to explain when the signature has several.")
flags.DEFINE_enum("score", "logit", SCORE_NAMES, "convert: what is explained for the top class: "
                  "the pre-softmax logit (default) or the softmax probability.")
flags.DEFINE_bool("overwrite", False, "convert: replace DST if it exists (otherwise it is left untouched).")
flags.DEFINE_bool("json", False, "inspect/convert: print JSON instead of text.")
flags.DEFINE_bool("verbose", False, "log progress, TensorFlow's warnings, and tracebacks of internal errors.")

# Which flags each command accepts (besides --verbose and absl's own); others are a usage error.
COMMANDS = {
    "inspect": ({"signature", "json"}, ("MODEL",)),
    "convert": ({"layers", "exclude_layers", "rule", "signature", "output", "score", "overwrite", "json"}, ("SRC", "DST")),
}
_OUR_FLAGS = {"layers", "exclude_layers", "rule", "signature", "output", "score", "overwrite", "json"}


class UsageError(Exception):
    """Bad command-line usage: exit status 2."""


def _usage_text() -> str:
    flag_help = FLAGS.module_help(sys.modules[__name__])
    return f"{__doc__.strip()}\n\n{PROGRAM} {__version__}. Flags:\n{flag_help}\n"


def _parse_flags(argv: list[str]) -> list[str]:
    if any(a in ("-h", "--help", "-help", "help", "--helpshort") for a in argv[1:]) or len(argv) == 1:
        sys.stdout.write(_usage_text())
        sys.exit(0 if len(argv) > 1 else 2)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _usage_exit(str(e))


def _usage_exit(message: str) -> None:
    sys.stderr.write(f"{PROGRAM}: usage error: {message}\nRun '{PROGRAM} --help' for usage.\n")
    sys.exit(2)


def _check_usage(args: list[str]) -> tuple[str, list[str]]:
    if not args:
        raise UsageError(f"missing command; commands: {', '.join(COMMANDS)}")
    command, positional = args[0], args[1:]
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    allowed, names = COMMANDS[command]
    if len(positional) != len(names):
        raise UsageError(f"'{command}' takes {' '.join(names)}, got {len(positional)} argument(s): "
                         f"{' '.join(positional) or '(none)'}")
    stray = sorted(name for name in _OUR_FLAGS - allowed if FLAGS[name].present)
    if stray:
        raise UsageError(f"'{command}' does not take --{', --'.join(stray)}")
    return command, positional


def _print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _inspect(model: str) -> None:
    from gbp_rewrite.inspection import inspect

    info = inspect(model, signature=FLAGS.signature if FLAGS["signature"].present else None)
    _print_json(info.to_dict()) if FLAGS.json else print(info.to_text())


def _convert(source: str, destination: str) -> None:
    from gbp_rewrite.converter import convert

    report = convert(
        source, destination,
        layers=FLAGS.layers, exclude_layers=FLAGS.exclude_layers, rule=FLAGS.rule,
        signature=FLAGS.signature, output=FLAGS.output, score=FLAGS.score, overwrite=FLAGS.overwrite,
    )
    _print_json(report.to_dict()) if FLAGS.json else print(report.to_text())


_HANDLERS = {"inspect": _inspect, "convert": _convert}


def _raise_interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    try:
        command, positional = _check_usage(argv[1:])
    except UsageError as e:
        _usage_exit(str(e))
    _configure_logging()
    _import_tensorflow_quietly()
    # SIGTERM unwinds like Ctrl-C, so temporary output is removed on the way out.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from gbp_rewrite.errors import GbpError

    try:
        _HANDLERS[command](*positional)
    except GbpError as e:
        sys.stderr.write(f"{PROGRAM}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROGRAM}: interrupted; nothing was written\n")
        return 130
    except Exception as e:  # noqa: BLE001 - a CLI user gets one line, --verbose the traceback
        if FLAGS.verbose:
            raise
        from gbp_rewrite.errors import one_line

        sys.stderr.write(f"{PROGRAM}: internal error: {type(e).__name__}: {one_line(e)} "
                         "(run with --verbose for the traceback)\n")
        return 1
    return 0


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up lines (oneDNN, CUDA probing) kept off the terminal.

    They are printed before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, so stderr itself is redirected
    for the import; if the import fails, what it printed is shown after all.
    """
    if FLAGS.verbose:
        import tensorflow  # noqa: F401
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _configure_logging() -> None:
    import logging

    level = logging.INFO if FLAGS.verbose else logging.ERROR
    absl_logging.set_verbosity(absl_logging.INFO if FLAGS.verbose else absl_logging.ERROR)
    logging.getLogger().setLevel(level)
    logging.getLogger("gbp_rewrite").setLevel(logging.INFO if FLAGS.verbose else logging.WARNING)
    if FLAGS.verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


def run() -> None:
    """Console-script entry point."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
