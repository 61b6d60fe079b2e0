"""The trainer's tiny LM: a smoke test of train.py, the Trainer, Orbax resume and logging (seconds on CPU).

Run:  python train.py --config=configs/toy.py --config.workdir=runs/toy --config.trainer.total_steps=50
Rerunning the same command resumes from the latest checkpoint in the workdir. Fields: see
``fusion_jax.train.toy.get_config``.
"""
from fusion_jax.train.toy import get_config as _get_config


def get_config(preset=None):
    return _get_config(preset)
