"""``fusion-jax teacher-pass CONFIG [--config.a.b=value ...]``: the teacher stores of a FuseLLM / FuseChat
config (its stages 1-3: models, corpus, one store per teacher and, with ``distill.with_ref_model``, the
student's own), written where ``python train.py`` with the same config finds and reuses them."""
from __future__ import annotations

_USAGE = """usage: fusion-jax teacher-pass CONFIG[:PRESET] [--config.FIELD=VALUE ...]

Run every teacher of a distillation config (configs/fusellm.py, configs/fusechat.py) over its corpus and
store per token its top-k log-probabilities and cross-entropy (resumable; rerun to finish a killed pass).
"""


def teacher_pass(config) -> dict:
    """Stages 1-3 of :mod:`fusion_jax.distill.pipeline`; returns ``{store name: summary}``."""
    from fusion_jax.distill.pipeline import prepare, start
    from fusion_jax.distill.teacher_pass import store_summary
    from fusion_jax.train.run import log
    c, mesh, run = start(config)
    *_, stores = prepare(c, run, mesh)
    out = {n: store_summary(s) for n, s in stores.items()}
    for n, s in out.items():
        log(f"{n}: {s['path']}: {s['n_sequences']} sequences, {s['n_tokens']} tokens, "
            f"{s['bytes_per_token']:.1f} bytes/token, mean sequence CE {s['mean_seq_ce']:.3f}")
    return out


def _command(args) -> int:
    from fusion_jax.train.cli import load_config
    argv = list(args.argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(_USAGE)
        return 0 if argv else 2
    if not argv[0].startswith("--"):
        argv[0] = f"--config={argv[0]}"
    teacher_pass(load_config(argv, default=""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("teacher-pass", prefix_chars="+", add_help=False,
                              help="run the teachers of a FuseLLM/FuseChat config over its corpus into top-k stores")
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=_command)
