"""The fusion arena: every fusion method of fusion-jax on the demo zoo, evaluated side by side.

Run:  python train.py --config=configs/arena.py            # the demo zoo, every method (<= 15 min on 2 cores,
                                                           # zoo cached; ~4 min more to build it cold)
      fusion-jax arena --config=configs/arena.py:smoke     # toy size (a test runs it)
      python train.py --config=configs/arena.py --config.contestants="('base','ties','ultrafuser')"

Writes runs/arena/: report.md (one table), report.json, arena.png, outputs/<contestant>/ (every item's
output), work/ (built models, per-method stages: rerun the same command to resume).

  contestants        which to run (default: all; a method whose wing is not installed is listed as missing)
  ultrafuser.preset  the UltraFuser config (configs/ultrafuser.py) whose zoo, data and schedule are used;
                     ultrafuser.reuse_dir: a finished main-job run with the same fingerprint is reused
  merges.<method>    each merge's parameters (mergekit names); merges.slerp.pair: the two specialists
  multitask          the multi-task baseline's lr/warmup (its steps and batch: UltraFuser's budget)
  eval.*             held-out loss examples per domain, math problems, code tasks, generation lengths
"""
from fusion_jax.arena.config import get_config as _get_config


def get_config(preset: str | None = None):
    return _get_config(preset)
