"""gbp-rewrite: make TensorFlow models explain themselves with guided backpropagation.

The absl application, with subcommands on absl's argparse_flags: one module per command in this
package (NAME, SUMMARY, add_arguments(parser), run(args)), each with its own flags and --help. This
module parses, runs the command and turns every failure into one line and an exit status: 0
success, 1 the job failed (one-line reason), 2 bad usage (bare `gbp-rewrite` too: it lists the
commands).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is not for users of a CLI; set
# before TensorFlow is imported, and only if the user has not chosen a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from absl.flags import argparse_flags  # noqa: E402

from gbp_rewrite._version import __version__  # noqa: E402
from gbp_rewrite.cli import common, convert_command, explain_command, inspect_command  # noqa: E402
from gbp_rewrite.cli import decode_command, request_command, sanity_command, verify_command  # noqa: E402
from gbp_rewrite.cli.common import PROGRAM, UsageError  # noqa: E402
from gbp_rewrite.errors import GbpError, one_line  # noqa: E402

COMMANDS = {module.NAME: module for module in (inspect_command, convert_command, explain_command,
                                               verify_command, request_command, decode_command,
                                               sanity_command)}
EXIT_STATUS = "Exit status: 0 success, 1 the job failed (a one-line reason on stderr), 2 bad usage."


class _Parser(argparse_flags.ArgumentParser):
    """argparse_flags' parser whose usage errors are one line, status 2, and point to --help."""

    def error(self, message: str):
        _usage_exit(message, command=self.prog[len(PROGRAM):].strip() or None)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (absl's own flags, shown by --helpfull) and one sub-parser per command."""
    parser = _Parser(
        prog=PROGRAM, allow_abbrev=False, epilog=EXIT_STATUS,
        description=f"{PROGRAM} {__version__}: make TensorFlow models explain themselves with guided "
                    f"backpropagation. Run '{PROGRAM} COMMAND --help' for a command's flags.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for module in COMMANDS.values():
        # inherited_absl_flags=None: absl's flags belong to the top level, not to every command.
        sub = commands.add_parser(module.NAME, help=module.SUMMARY, description=module.SUMMARY,
                                  epilog=EXIT_STATUS, allow_abbrev=False, inherited_absl_flags=None)
        module.add_arguments(sub)
        common.add_verbose(sub)
    return parser


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """argv (the program name first) -> the parsed arguments; usage errors and --help exit."""
    parser = build_parser()
    if len(argv) == 1:  # bare `gbp-rewrite`: the command list, as a usage error
        sys.stderr.write(parser.format_help())
        sys.exit(2)
    if argv[1] == "help":  # `gbp-rewrite help [COMMAND]`, as `git help` does
        return parser.parse_args([*argv[2:3], "--help"])
    argv, passthrough = _split_passthrough(argv)
    args, stray = parser.parse_known_args(argv[1:])
    if stray:  # flags of another command, or extra arguments
        _usage_exit(f"'{args.command}' does not take {' '.join(stray)}", command=args.command)
    if passthrough and not getattr(COMMANDS[args.command], "TAKES_PASSTHROUGH", False):
        _usage_exit(f"'{args.command}' takes no arguments after --: {' '.join(passthrough)}", command=args.command)
    args.passthrough = passthrough
    return args


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """What follows a `--` is for another program a command hands it to, not for us."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def _usage_exit(message: str, *, command: str | None = None) -> None:
    target = f"{PROGRAM} {command}" if command else PROGRAM
    sys.stderr.write(f"{PROGRAM}: usage error: {message}\nRun '{target} --help' for usage.\n")
    sys.exit(2)


def _raise_interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signum}")


def main(args: argparse.Namespace) -> int:
    module = COMMANDS[args.command]
    _configure_logging(verbose=args.verbose)
    try:  # before TensorFlow is imported: a usage error answers at once
        getattr(module, "check_usage", _no_usage_check)(args)
    except UsageError as e:
        _usage_exit(str(e), command=module.NAME)
    _import_tensorflow_quietly(verbose=args.verbose)
    # SIGTERM unwinds like Ctrl-C, so temporary output is removed on the way out.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        module.run(args)
    except UsageError as e:
        _usage_exit(str(e), command=module.NAME)
    except GbpError as e:
        sys.stderr.write(f"{PROGRAM}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROGRAM}: interrupted; nothing was left half-written\n")
        return 130
    except Exception as e:  # noqa: BLE001 - a CLI user gets one line, --verbose the traceback
        if args.verbose:
            raise
        sys.stderr.write(f"{PROGRAM}: internal error: {type(e).__name__}: {one_line(e)} "
                         "(run with --verbose for the traceback)\n")
        return 1
    return 0


def _no_usage_check(args: argparse.Namespace) -> None:
    del args


def _import_tensorflow_quietly(*, verbose: bool) -> None:
    """Import TensorFlow with its C++ start-up lines (oneDNN, CUDA probing) kept off the terminal.

    They are printed before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, so stderr itself is redirected
    for the import; if the import fails, what it printed is shown after all.
    """
    if verbose:
        import tensorflow  # noqa: F401
        return
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


def _configure_logging(*, verbose: bool) -> None:
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("gbp_rewrite").setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


def run() -> None:
    """Console-script entry point."""
    app.run(_main_then_exit, flags_parser=parse_command_line)


def _main_then_exit(args: argparse.Namespace) -> None:
    """main(), then exit at once with its status.

    Python's normal exit tears down every graph and function TensorFlow built, which takes seconds
    after a large model (1.3 s after converting ResNet50) while the work is done and written: the
    export is in place and temporary files are gone before main returns. So the output streams and
    log handlers are flushed and the process ends without that teardown.
    """
    status = main(args)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            pass
    logging.shutdown()
    os._exit(status)


if __name__ == "__main__":
    run()
