"""The trainer shared by every method: state, optimizer, jitted step, Orbax checkpoints, metrics, loop.

Public API::

    from fusion_jax.train import Trainer, TrainerConfig, OptimizerConfig, losses
    trainer = Trainer(loss_fn, params, OptimizerConfig(learning_rate=3e-4), TrainerConfig(total_steps=100,
                      workdir="runs/x"), trainable=r"^gate/", mesh=mesh, param_logical_axes=axes)
    result = trainer.run(data_iterator)

See ``loop.py`` for the loss_fn signature, the data protocol and resume semantics, ``checkpointing.py``
for the checkpoint layout, ``cli.py`` for the ``train.py`` / ``fusion-jax train`` entry point.

The names below are imported on first use, so that ``fusion_jax.train.cli`` (imported when the
``fusion-jax`` parser is built) does not pull in jax.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "fusion_jax.train.loop",
    "TrainerConfig": "fusion_jax.train.loop",
    "TrainResult": "fusion_jax.train.loop",
    "OptimizerConfig": "fusion_jax.train.optimizer",
    "build_optimizer": "fusion_jax.train.optimizer",
    "build_schedule": "fusion_jax.train.optimizer",
    "ParamSplit": "fusion_jax.train.state",
    "TrainState": "fusion_jax.train.state",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fusion_jax.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
