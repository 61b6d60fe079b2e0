"""``fusion-jax arena [--config=configs/arena.py[:PRESET]] [--config.a.b=VALUE ...]``: the same job as
``python train.py --config=configs/arena.py``."""
from __future__ import annotations

DEFAULT_CONFIG = "configs/arena.py"


def _arena(args) -> int:
    from fusion_jax.train.cli import load_config, run_from_config
    argv = list(args.argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    return run_from_config(load_config(argv, DEFAULT_CONFIG))


def register(subparsers) -> None:
    p = subparsers.add_parser("arena", prefix_chars="+", add_help=False,
                              help="every fusion method on the demo zoo, evaluated side by side")
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=_arena)
