"""The ``reczero`` command. Each command group lives next to the code it drives and
registers itself here through a ``register(subparsers)`` function."""

from __future__ import annotations

import argparse
import importlib
import sys

# "module:function" for every command group; imported lazily so `reczero --help`
# does not pay for importing jax.
COMMAND_GROUPS = (
    "reczero_jax.models.cli:register",
    "reczero_jax.data.cli:register",
    "reczero_jax.train.cli:register",
    "reczero_jax.traces.cli:register",
    "reczero_jax.plan:register",
    "reczero_jax.compare:register",
    "reczero_jax.demo:register",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reczero",
        description="RecZero / RecOne (Think before Recommendation) in JAX.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMAND_GROUPS:
        module_name, function_name = entry.split(":")
        getattr(importlib.import_module(module_name), function_name)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
