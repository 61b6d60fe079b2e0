"""The ``fusion-jax`` command line: one subcommand per job, each registered by the package that owns it.

Command families are imported lazily: :data:`COMMANDS` names each subcommand, the module whose
``register(subparsers)`` adds it, and a one-line help. Only the family of the command being run is
imported (``fusion-jax merge`` does not pay for importing the trainer, torch or Orbax); the others
appear in ``--help`` as placeholders built from the table. Importing this module and building the
parser imports neither JAX nor any command family.

Every :class:`~fusion_jax.errors.FusionError` (and every OS error of the user's environment: a full
disk, a read-only filesystem) is printed as ``error: <message>`` and exits with status 2. SIGINT and
SIGTERM stop the command cleanly (temporary outputs removed) with status 130 and 143. Other exceptions
are bugs and keep their traceback. See :mod:`fusion_jax.utils.entry`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path


#: (subcommand, module with ``register(subparsers)`` that adds it, help). A module may add several.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("convert", "fusion_jax.hf.cli", "convert checkpoints between HF safetensors and Orbax"),
    ("merge", "fusion_jax.merging.cli", "merge models per a mergekit-style YAML config"),
    ("dare", "fusion_jax.merging.cli", "DARE one fine-tune onto its base (drop and rescale its delta)"),
    ("teacher-pass", "fusion_jax.distill.cli",
     "run the teachers of a FuseLLM/FuseChat config over its corpus into compact top-k stores"),
    ("upcycle", "fusion_jax.xft.cli", "upcycle a dense model into an MoE (XFT: E copies of each FFN, expert 0 shared)"),
    ("moe", "fusion_jax.xft.cli", "build an MoE from specialists per a mergekit-moe YAML"),
    ("merge-back", "fusion_jax.xft.cli", "merge an MoE's experts back into a dense model (XFT)"),
    ("train", "fusion_jax.train.cli",
     "train per an ml_collections config (--config=PATH[:PRESET], --config.a.b=VALUE overrides)"),
    ("generate", "fusion_jax.eval.cli", "generate text from any fusion-jax model"),
    ("eval", "fusion_jax.eval.cli", "evaluate any fusion-jax model (loss, math, code) into a report"),
    ("arena", "fusion_jax.arena.cli", "every fusion method on the demo zoo, evaluated side by side"),
)


def _module_file_exists(module: str) -> bool:
    """Whether ``module`` is part of this install, WITHOUT importing its parent packages (whose
    ``__init__`` may import JAX): look for the file under the ``fusion_jax`` package directory."""
    root = Path(importlib.util.find_spec("fusion_jax").origin).parent
    rel = Path(*module.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def available_commands() -> list[tuple[str, str, str]]:
    """The rows of :data:`COMMANDS` whose module exists in this install."""
    return [row for row in COMMANDS if _module_file_exists(row[1])]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser. Only ``command``'s family is imported and registers its real subparsers;
    every other command is a placeholder (its help line from the table, arguments unparsed)."""
    parser = argparse.ArgumentParser(prog="fusion-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rows = available_commands()
    for name, module, _ in rows:
        if name == command:
            importlib.import_module(module).register(sub)
            break
    for name, _, help_ in rows:
        if name not in sub.choices:
            p = sub.add_parser(name, help=help_, add_help=False)
            p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _command_of(argv: list[str]) -> str | None:
    # the top-level parser has no options besides -h, so the first non-option word is the command
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):  # a table row whose module did not register that command
        parser.error(f"command {args.command!r} is listed but its module did not register it")
    from fusion_jax.utils import entry
    return entry.run(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
