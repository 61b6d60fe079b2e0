"""The ``fusion-jax`` command line: one subcommand per job, each registered by the package that owns it.

Every :class:`~fusion_jax.errors.FusionError` is printed as ``error: <message>`` and exits with status 2;
other exceptions are bugs and keep their traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fusion_jax.errors import FusionError

# Each module exposes ``register(subparsers)``, which adds its subcommands and sets ``func(args) -> int``.
_COMMAND_MODULES = (
    "fusion_jax.hf.cli",        # convert
    "fusion_jax.merging.cli",   # merge, dare
    "fusion_jax.train.cli",     # train
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that command family is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
