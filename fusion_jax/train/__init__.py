"""The trainer shared by every method: state, optimizer, jitted step, Orbax checkpoints, metrics, loop.

Public API::

    from fusion_jax.train import Trainer, TrainerConfig, OptimizerConfig, losses
    trainer = Trainer(loss_fn, params, OptimizerConfig(learning_rate=3e-4), TrainerConfig(total_steps=100,
                      workdir="runs/x"), trainable=r"^gate/", mesh=mesh, param_logical_axes=axes)
    result = trainer.run(data_iterator)

See ``loop.py`` for the loss_fn signature, the data protocol and resume semantics, ``checkpointing.py``
for the checkpoint layout.
"""
from fusion_jax.train.loop import Trainer, TrainerConfig, TrainResult
from fusion_jax.train.optimizer import OptimizerConfig, build_optimizer, build_schedule
from fusion_jax.train.state import ParamSplit, TrainState

__all__ = ["Trainer", "TrainerConfig", "TrainResult", "OptimizerConfig", "build_optimizer",
           "build_schedule", "ParamSplit", "TrainState"]
