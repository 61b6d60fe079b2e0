"""The training entry point shared by ``python train.py`` and ``fusion-jax train``.

Usage (both spellings take the same arguments)::

    python train.py --config=configs/<method>.py[:preset] [--config.a.b=value ...]
    fusion-jax train --config=configs/<method>.py[:preset] [--config.a.b=value ...]

The config file is an ml_collections config (``get_config(preset=None)``), parsed with absl flags and
``ml_collections.config_flags``, so every field can be overridden as ``--config.a.b=value``. The job is
chosen by ``config.method`` through :data:`METHODS`, a table ``{method: "module:function"}``; the
function takes the ConfigDict and returns an exit status (``None`` or a non-int result means 0). Each
method initializes ``jax.distributed`` itself from its config (see ``distributed.initialize``).

Public API: :func:`run_from_config`, :func:`load_config`, :func:`main`, :func:`register`,
:data:`METHODS`. Nothing here imports jax at import time (the ``fusion-jax`` parser is built without it).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Sequence

from fusion_jax.errors import ConfigError, FusionError

DEFAULT_CONFIG = "configs/ultrafuser.py"

# method -> "module:function(config) -> int | None"; imported only when that method runs.
METHODS: dict[str, str] = {
    "ultrafuser": "fusion_jax.ultrafuser.pipeline:run",
    "fusellm": "fusion_jax.distill.pipeline:run",
    "fusechat": "fusion_jax.distill.pipeline:run",
    "toy": "fusion_jax.train.toy:run",   # the trainer's tiny LM (a smoke test of the whole stack)
    "xft": "fusion_jax.xft.pipeline:run",
    "arena": "fusion_jax.arena.pipeline:run",   # every fusion method on the demo zoo, side by side
}

# method -> the config options naming directories it writes: checked before the job starts, so a file or a
# read-only filesystem there is one clear error rather than a traceback after the first training stage
OUTPUT_OPTIONS: dict[str, tuple[str, ...]] = {
    "ultrafuser": ("output_dir",),
    "toy": ("workdir",),
    "xft": ("output_dir",),
}

_USAGE = """usage: {prog} [--config=PATH[:PRESET]] [--config.FIELD=VALUE ...]

Run the job that the config's `method` names ({methods}).

  --config=PATH[:PRESET]   ml_collections config file (get_config(PRESET)); default {default}
  --config.a.b=VALUE       override one field of the config (repeatable)
  --flagfile=FILE          read more flags from FILE
"""


def run_from_config(config: Any) -> int:
    """Run the method named by ``config.method``; returns the exit status.

    Raises :class:`ConfigError` naming ``config.method`` and the known methods when the method is missing
    or unknown.
    """
    method = config.get("method") if hasattr(config, "get") else getattr(config, "method", None)
    if not method:
        raise ConfigError(f"config.method: not set; known methods: {', '.join(sorted(METHODS))}")
    target = METHODS.get(str(method))
    if target is None:
        raise ConfigError(f"config.method: {method!r} is not a known method; known methods: "
                          f"{', '.join(sorted(METHODS))}")
    from fusion_jax.utils.atomic import check_writable_dir, resolve_output
    for option in OUTPUT_OPTIONS.get(str(method), ()):
        value = config.get(option) if hasattr(config, "get") else getattr(config, option, None)
        if value:
            path = os.path.expanduser(str(value))
            check_writable_dir(path, f"config.{option}")
            # created now, through a symlink that points to a directory not made yet, so that every
            # writer below (Orbax, the metrics files) finds a directory there
            os.makedirs(resolve_output(path), exist_ok=True)
    module_name, func_name = target.split(":")
    fn = getattr(importlib.import_module(module_name), func_name)
    try:
        status = fn(config)
    except KeyboardInterrupt as e:
        # the trainer finished the checkpoint it was writing (see train/checkpointing.py)
        e.add_note("the checkpoints written so far are kept: run the same command to resume")
        raise
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def load_config(argv: Sequence[str], default: str = DEFAULT_CONFIG):
    """Parse ``--config=PATH[:PRESET]`` and ``--config.a.b=value`` arguments into a ConfigDict.

    Uses a private absl ``FlagValues`` (so it can be called more than once, and never touches the global
    ``absl.flags.FLAGS``). Raises :class:`ConfigError` for a config file that does not exist or does not
    load, an unknown preset or field, a malformed value, or any other argument.
    """
    def is_flag(a: str) -> bool:
        return a.startswith(("--config", "--flagfile"))

    # a word that is not a flag is only allowed as the value of the flag before it ("--config PATH")
    stray = [a for i, a in enumerate(argv) if not is_flag(a)
             and not (i and is_flag(argv[i - 1]) and "=" not in argv[i - 1])]
    if stray:
        raise ConfigError(f"unexpected argument {stray[0]!r}; expected --config=PATH[:PRESET] and "
                          "--config.FIELD=VALUE overrides")
    path = _config_path(argv, default)
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"--config: {path}: no such config file")
    overrides = [a for a in argv if a.startswith("--config.")]
    if overrides:  # name the override at fault before config_flags reports a bare KeyError
        _check_override_paths(_parse([a for a in argv if a not in overrides], default, path), overrides, path)
    return _parse(argv, default, path)


def _parse(argv: Sequence[str], default: str, path: str | None):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    args = ["train", *argv]
    # sys_argv: config_flags otherwise finds the --config.* overrides in the real sys.argv
    holder = config_flags.DEFINE_config_file("config", default, "job configuration file", flag_values=fv,
                                             lock_config=False, sys_argv=args)
    try:
        fv(args)
        config = holder.value
    except FusionError:
        raise
    except flags.Error as e:  # an unknown field, a value of the wrong type, a bad flagfile
        raise ConfigError(f"--config: {e}") from e
    except (OSError, ImportError, SyntaxError, AttributeError, KeyError, TypeError, ValueError) as e:
        # config_flags reports a file that fails to import (or whose get_config fails) as OSError
        raise ConfigError(f"--config: cannot load {path or default}: {e}") from e
    return config


def _check_override_paths(config, overrides: Sequence[str], path: str | None) -> None:
    for arg in overrides:
        name = arg[len("--config."):].split("=", 1)[0]
        node, seen = config, "config"
        for part in name.split("."):
            if not hasattr(node, "keys"):
                break  # below a leaf (e.g. an index into a tuple): config_flags checks the rest
            if part not in node.keys():
                raise ConfigError(f"--config.{name}: {seen} has no field {part!r} (in {path}; its fields: "
                                  f"{', '.join(sorted(node.keys()))})")
            node, seen = node[part], f"{seen}.{part}"


def _config_path(argv: Sequence[str], default: str) -> str | None:
    """The config file the arguments name (the last ``--config=``), without its ``:preset``."""
    spec = default
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    if not spec:
        return None
    # "configs/x.py:preset" -> "configs/x.py" (a ':' inside the directory part is left alone)
    head, sep, tail = spec.rpartition(":")
    return head if sep and head.endswith(".py") else spec


def main(argv: Sequence[str] | None = None, *, default: str = DEFAULT_CONFIG, prog: str = "train.py") -> int:
    """Parse ``argv`` (without the program name), run the job; returns the exit status.

    A :class:`FusionError` (or a full disk, a read-only output...) prints ``error: <message>`` on stderr
    and returns 2; SIGINT / SIGTERM stop the run cleanly (the checkpoint being written is completed, so
    the same command resumes) and return 130 / 143 (see :mod:`fusion_jax.utils.entry`)."""
    from fusion_jax.utils import entry
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv):
        print(_USAGE.format(prog=prog, methods=", ".join(sorted(METHODS)), default=default))
        return 0
    return entry.run(lambda: run_from_config(load_config(argv, default)))


def _train_command(args) -> int:
    # fusion_jax.cli prints FusionError and maps it to exit 2; load and run here
    argv = list(args.argv)
    if any(a in ("-h", "--help") for a in argv):
        print(_USAGE.format(prog="fusion-jax train", methods=", ".join(sorted(METHODS)), default=DEFAULT_CONFIG))
        return 0
    return run_from_config(load_config(argv))


def register(subparsers) -> None:
    """``fusion-jax train --config=PATH[:PRESET] [--config.a.b=value ...]``.

    The subcommand hands its arguments unparsed to absl/config_flags (argparse cannot express the open
    set of ``--config.a.b`` flags), hence ``prefix_chars="+"``: every ``--...`` argument is a plain value.
    """
    p = subparsers.add_parser("train", prefix_chars="+", add_help=False,
                              help="train per an ml_collections config (--config=PATH[:PRESET], "
                                   "--config.a.b=VALUE overrides)")
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=_train_command)
