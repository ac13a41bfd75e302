"""gbp-rewrite: make TensorFlow models explain themselves with guided backpropagation.

The absl application: one module per command in this package (NAME, ARGS, SUMMARY, FLAG_NAMES,
run(*args)); this module parses flags, checks usage, runs the command and turns every failure into
one line and an exit status: 0 success, 1 the job failed (one-line reason), 2 bad usage.
"""

from __future__ import annotations

import os
import signal
import sys

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is not for users of a CLI; set
# before TensorFlow is imported, and only if the user has not chosen a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from gbp_rewrite._version import __version__  # noqa: E402
from gbp_rewrite.cli import common, convert_command, explain_command, inspect_command  # noqa: E402
from gbp_rewrite.cli import decode_command, request_command, verify_command  # noqa: E402
from gbp_rewrite.cli import sanity_command  # noqa: E402

PROGRAM = "gbp-rewrite"
FLAGS = flags.FLAGS

COMMANDS = {module.NAME: module for module in (inspect_command, convert_command, explain_command,
                                               verify_command, request_command, decode_command,
                                               sanity_command)}
_GLOBAL_FLAGS = {"verbose"}


class UsageError(Exception):
    """Bad command-line usage: exit status 2 (a command's run() may raise it for flag combinations)."""


def _our_flags() -> set[str]:
    return set().union(*(m.FLAG_NAMES for m in COMMANDS.values()))


def usage_text() -> str:
    lines = [f"{PROGRAM} {__version__}: make TensorFlow models explain themselves with guided "
             "backpropagation.", "", "Usage:"]
    for module in COMMANDS.values():
        flag_list = " ".join(f"[--{f}]" for f in sorted(module.FLAG_NAMES))
        lines.append(f"  {PROGRAM} {module.NAME} {' '.join(module.ARGS)} {flag_list}")
    lines += ["", "Commands:"]
    for module in COMMANDS.values():
        lines.append(f"  {module.NAME:<9} {module.SUMMARY}")
    lines += ["", "Exit status: 0 success, 1 the job failed (a one-line reason on stderr), 2 bad usage.",
              "", "Flags:"]
    modules = [common, *COMMANDS.values()]
    for module in modules:
        text = FLAGS.module_help(module)
        if text.strip():
            lines.append(text.split("\n", 1)[1] if text.startswith(module.__name__) else text)
    return "\n".join(lines) + "\n"


def _parse_flags(argv: list[str]) -> list[str]:
    if len(argv) == 1 or any(a in ("-h", "--help", "-help", "help", "--helpshort") for a in argv[1:]):
        sys.stdout.write(usage_text())
        sys.exit(0 if len(argv) > 1 else 2)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _usage_exit(str(e))


def _usage_exit(message: str) -> None:
    sys.stderr.write(f"{PROGRAM}: usage error: {message}\nRun '{PROGRAM} --help' for usage.\n")
    sys.exit(2)


def _check_usage(args: list[str]):
    if not args:
        raise UsageError(f"missing command; commands: {', '.join(COMMANDS)}")
    name, positional = args[0], args[1:]
    if name not in COMMANDS:
        raise UsageError(f"unknown command {name!r}; commands: {', '.join(COMMANDS)}")
    module = COMMANDS[name]
    if len(positional) != len(module.ARGS):
        raise UsageError(f"'{name}' takes {' '.join(module.ARGS)}, got {len(positional)} argument(s): "
                         f"{' '.join(positional) or '(none)'}")
    stray = sorted(f for f in _our_flags() - module.FLAG_NAMES - _GLOBAL_FLAGS if FLAGS[f].present)
    if stray:
        raise UsageError(f"'{name}' does not take --{', --'.join(stray)}")
    return module, positional


def _raise_interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    try:
        module, positional = _check_usage(argv[1:])
    except UsageError as e:
        _usage_exit(str(e))
    _configure_logging()
    _import_tensorflow_quietly()
    # SIGTERM unwinds like Ctrl-C, so temporary output is removed on the way out.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from gbp_rewrite.errors import GbpError, one_line

    try:
        module.run(*positional)
    except UsageError as e:
        _usage_exit(str(e))
    except GbpError as e:
        sys.stderr.write(f"{PROGRAM}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROGRAM}: interrupted; nothing was left half-written\n")
        return 130
    except Exception as e:  # noqa: BLE001 - a CLI user gets one line, --verbose the traceback
        if FLAGS.verbose:
            raise
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

    absl_logging.set_verbosity(absl_logging.INFO if FLAGS.verbose else absl_logging.ERROR)
    logging.getLogger().setLevel(logging.INFO if FLAGS.verbose else logging.ERROR)
    logging.getLogger("gbp_rewrite").setLevel(logging.INFO if FLAGS.verbose else logging.WARNING)
    if FLAGS.verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


def run() -> None:
    """Console-script entry point."""
    app.run(_main_then_exit, flags_parser=_parse_flags)


def _main_then_exit(argv: list[str]) -> None:
    """main(), then exit at once with its status.

    Python's normal exit tears down every graph and function TensorFlow built, which takes seconds
    after a large model (1.3 s after converting ResNet50) while the work is done and written: the
    export is in place and temporary files are gone before main returns. So the output streams and
    log handlers are flushed and the process ends without that teardown.
    """
    status = main(argv)
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            pass
    logging.shutdown()
    os._exit(status)


if __name__ == "__main__":
    run()
