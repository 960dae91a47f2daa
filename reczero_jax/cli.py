"""The ``reczero`` command. Each command group lives next to the code it drives and
registers itself here through a ``register(subparsers)`` function.

Expected failures (bad input: a missing file or directory, a bad config value or key, a model
or dataset directory that is not one, a mesh that does not fit) are raised as ``ValueError``
or ``OSError`` with a message that names the problem and its fix; ``main`` prints that as one
line ``error: <message>`` on stderr and returns 2. ``--debug`` (or ``RECZERO_DEBUG=1``) lets
the exception through with its traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# "module:function" for every command group, imported when the parser is built.
COMMAND_GROUPS = (
    "reczero_jax.models.cli:register",
    "reczero_jax.data.cli:register",
    "reczero_jax.train.cli:register",
    "reczero_jax.traces.cli:register",
    "reczero_jax.plan:register",
    "reczero_jax.compare:register",
    "reczero_jax.demo:register",
)
# What a command raises for input the user can fix (see the module docstring).
EXPECTED_ERRORS = (ValueError, OSError)
EXIT_ERROR = 2  # argparse's status for a usage error too
DEBUG_ENV = "RECZERO_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reczero",
        description="RecZero / RecOne (Think before Recommendation) in JAX.",
        epilog=f"A failure prints one 'error:' line (exit status {EXIT_ERROR}); --debug or "
               f"{DEBUG_ENV}=1 shows its traceback.",
    )
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a failure [{DEBUG_ENV}=1]")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMAND_GROUPS:
        module_name, function_name = entry.split(":")
        getattr(importlib.import_module(module_name), function_name)(subparsers)
    return parser


def error_line(error: BaseException) -> str:
    """``error: <message>`` on one line (a multi-line message joined with "; ")."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.strerror}: {error.filename}"  # what open() and friends raise
    else:
        message = str(error) or type(error).__name__
    return "error: " + "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as error:
        if debug:
            raise
        print(error_line(error), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
