"""A tiny self-contained NNX language model and data for trainer and sharding tests; the ``toy`` method.

It follows the zoo's conventions (logical-axis annotations on every Param, layers stacked on a leading
``layers`` axis, float32 logits) without depending on ``fusion_jax.models``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _param(key, shape, axes, scale=None):
    scale = (1.0 / np.sqrt(shape[-2])) if scale is None and len(shape) >= 2 else (scale or 1.0)
    # NumPy draws seeded by the key's bits: deterministic like jax.random.normal, but without compiling
    # one XLA program per shape (seconds on a loaded CPU, in every test subprocess).
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    w = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
    return nnx.Param(jnp.asarray(w), out_sharding=axes, eager_sharding=False)


class ToyLM(nnx.Module):
    """Embedding -> L x (RMSNorm, MLP residual) -> RMSNorm -> lm_head. Causal via a cumulative mean."""

    def __init__(self, vocab: int = 32, dim: int = 16, hidden: int = 24, layers: int = 2, *, rngs: nnx.Rngs):
        k = rngs.params
        self.embed = nnx.Dict(embedding=_param(k(), (vocab, dim), ("vocab", "embed"), 1.0))
        self.layers = nnx.Dict(
            norm=nnx.Dict(scale=nnx.Param(jnp.ones((layers, dim)), out_sharding=("layers", "embed"),
                                          eager_sharding=False)),
            up=nnx.Dict(kernel=_param(k(), (layers, dim, hidden), ("layers", "embed", "mlp")),
                        bias=nnx.Param(jnp.zeros((layers, hidden)), out_sharding=("layers", "mlp"),
                                       eager_sharding=False)),
            down=nnx.Dict(kernel=_param(k(), (layers, hidden, dim), ("layers", "mlp", "embed"))),
        )
        self.final_norm = nnx.Dict(scale=nnx.Param(jnp.ones((dim,)), out_sharding=("embed",), eager_sharding=False))
        self.lm_head = nnx.Dict(kernel=_param(k(), (dim, vocab), ("embed", "vocab")))

    def __call__(self, input_ids, attention_mask=None):
        x = self.embed["embedding"][...][input_ids]
        # causal mixing: running mean over previous positions
        denom = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        lay = self.layers
        for i in range(lay["norm"]["scale"].shape[0]):
            h = _rms(x) * lay["norm"]["scale"][i]
            h = jnp.cumsum(h, axis=1) / denom + h
            h = jax.nn.gelu(h @ lay["up"]["kernel"][i] + lay["up"]["bias"][i]) @ lay["down"]["kernel"][i]
            x = x + h
        x = _rms(x) * self.final_norm["scale"][...]
        return (x @ self.lm_head["kernel"][...]).astype(jnp.float32)


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def toy_batches(num_batches: int, batch: int, seq: int, vocab: int = 32, seed: int = 0):
    """Deterministic list of {input_ids, loss_mask} numpy batches with a learnable pattern."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_batches):
        start = rng.integers(0, vocab, size=(batch, 1))
        step = rng.integers(1, 3, size=(batch, 1))
        ids = ((start + step * np.arange(seq)[None, :]) % vocab).astype(np.int32)
        mask = np.ones((batch, seq), np.int32)
        mask[:, : seq // 4] = 0  # a "prompt" that is not trained on
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


class _RecordingSource:
    """A random-access source of toy examples that records which indices were read (tests check that
    each process reads only its share)."""

    def __init__(self, rows: dict, reads: list | None = None):
        self._rows = rows
        self._n = len(next(iter(rows.values())))
        self.reads = reads

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        if self.reads is not None:
            self.reads.append(int(i))
        return {k: v[i] for k, v in self._rows.items()}


def toy_grain_iterator(num_examples: int, global_batch: int, seq: int, vocab: int = 32, seed: int = 0,
                       process_index: int = 0, process_count: int = 1, reads: list | None = None):
    """A grain DatasetIterator (get_state/set_state) of process-local batches of toy sequences.

    The examples are shuffled once (``seed``) and repeated; process ``p`` of ``n`` reads only the examples
    ``p, p + n, p + 2n, ...`` of that stream (grain's usual sharding) and batches ``global_batch / n`` of
    them, so global batch ``t`` holds the same examples for every process count (the row order within the
    batch differs; a mean loss does not see it). ``reads`` (optional list) collects the source indices read.
    """
    import grain

    if global_batch % process_count:
        from fusion_jax.errors import ConfigError
        raise ConfigError(f"batch: {global_batch} is not divisible by the {process_count} processes")
    rows = toy_batches(1, num_examples, seq, vocab, seed)[0]
    ds = grain.MapDataset.source(_RecordingSource(rows, reads)).shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)
    # no read-ahead threads: the toy runs beside other processes on small CPUs, and ``reads`` stays exact
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def get_config(preset: str | None = None):
    """The toy job's config (``method = "toy"``): ``python train.py --config=configs/toy.py``."""
    import ml_collections as mlc

    if preset:
        from fusion_jax.errors import ConfigError
        raise ConfigError(f"preset: {preset!r} is unknown (the toy config has no presets)")

    c = mlc.ConfigDict()
    c.method = "toy"
    c.workdir = "runs/toy"                # checkpoints/ and logs/ go here; a rerun resumes
    c.model = mlc.ConfigDict({"vocab": 32, "dim": 16, "hidden": 24, "layers": 2, "seed": 0})
    c.data = mlc.ConfigDict({"num_examples": 64, "batch_size": 8, "seq_len": 16, "seed": 1})
    c.optimizer = mlc.ConfigDict({"learning_rate": 1e-2, "warmup_steps": 2, "weight_decay": 0.01})
    c.trainer = mlc.ConfigDict({"total_steps": 20, "save_every": 4, "keep_checkpoints": 3, "log_every": 1,
                                "grad_accum_steps": 1, "async_checkpointing": True, "progress": True,
                                "tensorboard": True})
    c.mesh = mlc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    # multi-process: set all three (or the FUSION_* environment variables), or coordinator_address="auto"
    c.distributed = mlc.ConfigDict({"coordinator_address": "", "num_processes": 1, "process_id": 0})
    return c


def train(config, callbacks=(), reads: list | None = None):
    """Train the toy LM per ``config`` (see :func:`get_config`); returns ``(trainer, TrainResult)``."""
    from fusion_jax import sharding as shd
    from fusion_jax.train import OptimizerConfig, Trainer, TrainerConfig, distributed
    from fusion_jax.train.losses import nnx_causal_lm_loss

    d = config.get("distributed") or {}
    if d and d.get("coordinator_address"):
        distributed.initialize(d)
    else:
        distributed.initialize(None)   # FUSION_* environment variables, if set
    m, dc = config.model, config.data
    mesh = shd.make_mesh(config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else config.mesh)
    model = ToyLM(vocab=m.vocab, dim=m.dim, hidden=m.hidden, layers=m.layers, rngs=nnx.Rngs(m.seed))
    g, p = nnx.split(model, nnx.Param)
    tr = Trainer(nnx_causal_lm_loss(g), nnx.to_pure_dict(p), OptimizerConfig.from_config(config.optimizer),
                 TrainerConfig.from_config(config.trainer, workdir=config.workdir),
                 mesh=mesh, param_logical_axes=shd.state_logical_axes(p), callbacks=callbacks)
    data = toy_grain_iterator(dc.num_examples, dc.batch_size, dc.seq_len, vocab=m.vocab, seed=dc.seed,
                              process_index=jax.process_index(), process_count=jax.process_count(), reads=reads)
    try:
        return tr, tr.run(data)
    finally:
        tr.close()


def run(config) -> int:
    """The ``toy`` method of ``train.py``: train, print where the outputs are."""
    tr, r = train(config)
    if jax.process_index() == 0:
        print(f"toy: {r.step} steps, final loss {r.history[-1]['loss']:.4f}" if r.history else
              f"toy: nothing to do (already at step {r.step})")
        print(f"toy: checkpoints in {tr.checkpointer.directory if tr.checkpointer else '-'}, "
              f"metrics in {config.workdir}/logs")
    return 0


def main(argv=None) -> int:
    """Train the toy LM from flags (used by the trainer's subprocess tests: resume, multi-process,
    multi-device); prints ``RESULT{json}`` and optionally saves the final params as .npz."""
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--mesh", default="")            # e.g. fsdp=2,tensor=4
    ap.add_argument("--coordinator", default="")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--sync", action="store_true", help="synchronous checkpointing")
    ap.add_argument("--no-tensorboard", action="store_true",
                    help="JSONL metrics only (tensorboardX imports torch when it is installed: seconds)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    c = get_config()
    c.workdir = a.workdir
    c.data.batch_size, c.data.seq_len = a.batch, a.seq
    c.trainer.update(total_steps=a.steps, save_every=a.save_every, keep_checkpoints=a.keep,
                     grad_accum_steps=a.grad_accum, async_checkpointing=not a.sync, progress=False,
                     tensorboard=not a.no_tensorboard)
    if a.mesh:
        c.mesh = {k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(","))}
    c.distributed.update(coordinator_address=a.coordinator, num_processes=a.num_processes, process_id=a.process_id)
    reads: list[int] = []
    cbs = [lambda step, m, tr: time.sleep(a.sleep)] if a.sleep else []
    tr, r = train(c, callbacks=cbs, reads=reads)

    from jax.experimental import multihost_utils
    flat = {k: np.asarray(jax.device_get(multihost_utils.process_allgather(v, tiled=True)))
            for k, v in tr.split.flat(r.params).items()}
    if a.out and jax.process_index() == 0:
        np.savez(a.out, **{k.replace("/", "."): v for k, v in flat.items()})
    print("RESULT" + json.dumps({"resumed_from": r.resumed_from, "step": r.step,
                                 "losses": [h["loss"] for h in r.history], "reads": reads}), flush=True)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
